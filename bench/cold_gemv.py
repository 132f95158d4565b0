"""A decode GEMV with its weights cold, as in a decode step: many copies of one quantized weight
cycled, so every call reads its weight from memory (the hot case, `bench/small_m.py`, reads it
from cache and hides what the layout's bytes cost).

    .venv/bin/python bench/cold_gemv.py [--fmt q4_k] [--shape down] [--rounds 5] [--megabytes 256]

(K-quants need K a multiple of 256: gemma-3-270m's Q4_K / Q6_K tensors are ffn_down and
attn_output, `--shape down` / `o`; its K = 640 linears are Q5_0 / Q8_0.)

The kernel is `small_m.build`'s decode GEMV (one row, this machine's CPU); about --megabytes of
copies of its weight (random bytes), best of --rounds passes over all of them. docs/kernels.md
has numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.small_m import SHAPES, build  # noqa: E402

SHAPES = {**SHAPES, "qkv": (1536, 640), "o": (640, 1024)}  # N, K (gemma-3-270m)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fmt", default="q4_k")
    p.add_argument("--shape", default="down", choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--megabytes", type=float, default=256)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm

    n, k = SHAPES[args.shape]
    lib, tensors = build("new", 1, n, k, args.fmt, "cpu")
    x, w, y = cast(list[Any], tensors)
    f = cast(Any, lib).mod["main"]
    shape = tuple(w.shape)
    size = int(np.prod(shape))
    copies = max(2, int(args.megabytes * 1e6 // size))
    rng = np.random.default_rng(0)
    weights = [tvm.runtime.tensor(rng.integers(0, 64, shape, dtype=np.uint8)) for _ in range(copies)]
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for w_ in weights:
            f(x, w_, y)
        best = min(best, (time.perf_counter() - t0) / copies)
    print(f"{args.fmt} {args.shape} N={n} K={k}: {size / 1e6:.2f} MB a weight, {copies} copies, best of "
          f"{args.rounds}: {best * 1e6:.1f} us, {size / best / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
