"""A decode GEMV with its weights cold, as in a decode step: many copies of one quantized weight
cycled, so every call reads its weight from memory (the hot case, `bench/small_m.py`, reads it
from cache and hides what the layout's bytes cost).

    .venv/bin/python bench/cold_gemv.py [--fmt q4_k] [--shape down] [--tiles g4c2,g8c2] [--rounds 5]

(K-quants need K a multiple of 256: gemma-3-270m's Q4_K / Q6_K tensors are ffn_down and
attn_output, `--shape down` / `o`; its K = 640 linears are Q5_0 / Q8_0.)

Each case is `weight_kernels.contraction` on x [1, 1, K] (il16 planes of --fmt) scheduled by
`weight_schedules.Gemv` with `gemv_groups` / `gemv_chains` forced (`g4c2`: 4 groups a task, 2
chains), on this machine's CPU; about 256 MB of copies (random blocks, f16 scales kept small),
best of --rounds passes over all of them. docs/kernels.md has numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gemm_tiles import compile_forced  # noqa: E402
from bench.small_m import SHAPES  # noqa: E402

SHAPES = {**SHAPES, "qkv": (1536, 640), "o": (640, 1024)}  # N, K (gemma-3-270m)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fmt", default="q4_k")
    p.add_argument("--shape", default="down", choices=sorted(SHAPES))
    p.add_argument("--tiles", default="g4c2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--megabytes", type=float, default=256)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm
    from tvm import te

    from rlx.hir.quant import quant_format
    from rlx.targets import machine, weight_kernels, weight_schedules
    from rlx.targets.block_planes import planes_of
    from rlx.targets.presets import resolve_target

    n, k = SHAPES[args.shape]
    resolved = resolve_target("cpu")
    params = machine.kernel_params(resolved.target)
    lines = planes_of(quant_format(args.fmt)).lines(n, k)
    cases = {}
    for tile in args.tiles.split(","):
        groups, chains = (int(v) for v in tile[1:].split("c"))
        x = te.placeholder((1, 1, k), name="x")
        w = te.placeholder((lines, machine.LANES), "uint8", name="w")
        y = weight_kernels.contraction(x, w, "il16", args.fmt, row_tile=params.gemm_rows, chains=chains)
        forced = dataclasses.replace(params, gemv_groups=groups, gemv_chains=chains)
        cases[tile] = compile_forced(weight_schedules.Gemv(), te.create_prim_func([x, w, y]), resolved.target,
                                     forced, [x, w, y])
    size = lines * machine.LANES
    copies = max(2, int(args.megabytes * 1e6 // size))
    rng = np.random.default_rng(0)
    weights = [tvm.runtime.tensor(rng.integers(0, 64, (lines, machine.LANES), dtype=np.uint8)) for _ in range(copies)]
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for tile, (lib, (x_, _, y_)) in cases.items():
            f = lib.mod["main"]  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            for w_ in weights:
                f(x_, w_, y_)
            best[tile] = min(best.get(tile, float("inf")), (time.perf_counter() - t0) / copies)
    print(f"{args.fmt} {args.shape} N={n} K={k}: {size / 1e6:.2f} MB a weight, {copies} copies, "
          f"best of {args.rounds}")
    for tile, sec in best.items():
        print(f"  {tile:8} {sec * 1e6:8.1f} us  {size / sec / 1e9:6.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
