"""Small-M linears (a decode step of M sequences), measured: the GEMV with x's rows in register
tiles inside the block loop (each weight block read and decoded once per tile: `new`) against
what ran before, interleaved: the GEMM (a dynamic step, and any static step over 4 rows before)
and the GEMV with one row per pass over the weights (`r1`: the static 1-2 row steps before).

    .venv/bin/python bench/small_m.py [--fmt q8_0] [--m 1,2,4,8,16] [--shape down,head] [--rounds 5]

Each case is `weight_kernels.contraction` on x [1, M, K] (il16 weights, blocks of --fmt) scheduled
by `weight_schedules.Gemv` / `Gemm`, compiled alone (no Relax), timed with TVM's time_evaluator;
rounds alternate the cases so machine noise hits all of them alike. docs/kernels.md has numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"down": (640, 2048), "head": (262144, 640), "gate_up": (2 * 2048, 640)}  # N, K (gemma-3-270m)
VARIANTS = ("new", "r1", "gemm")


def build(variant: str, m: int, n: int, k: int, fmt: str, target: str) -> tuple[object, list[object]]:
    from tvm import te

    from bench.gemm_tiles import compile_forced
    from rlx.hir.quant import quant_format
    from rlx.targets import machine, weight_kernels, weight_schedules
    from rlx.targets.block_planes import planes_of
    from rlx.targets.presets import resolve_target

    resolved = resolve_target(target)
    params = machine.kernel_params(resolved.target)
    x = te.placeholder((1, m, k), name="x")
    if fmt:
        w = te.placeholder((planes_of(quant_format(fmt)).columns(k) * n // machine.LANES, machine.LANES), "uint8",
                           name="w")
    else:
        w = te.placeholder((n // machine.LANES, k, machine.LANES), name="w")
    forced = dataclasses.replace(params, gemv_rows=1) if variant == "r1" else params
    rows = 0 if variant == "gemm" else weight_kernels.GEMV_ROWS
    chains = params.gemv_chains
    with mock.patch.object(weight_kernels, "GEMV_ROWS", rows):
        if variant == "r1":  # before: two chains per block whatever the rows
            with mock.patch.object(weight_kernels, "_rows_static", lambda _x, _m=m: 1 if _x is x else _m):
                y = weight_kernels.contraction(x, w, "il16", fmt, row_tile=params.gemm_rows, chains=chains)
        else:
            y = weight_kernels.contraction(x, w, "il16", fmt, row_tile=params.gemm_rows, chains=chains)
    func = te.create_prim_func([x, w, y])
    rule = weight_schedules.Gemm() if variant == "gemm" else weight_schedules.Gemv()
    return compile_forced(rule, func, resolved.target, forced, [x, w, y])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cpu")
    p.add_argument("--m", default="1,2,4,8,16")
    p.add_argument("--shape", default="down,head")
    p.add_argument("--fmt", default="q8_0", help="a weight format (q4_k, q8_0, ...); empty: float32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm

    cases = {}
    for shape in args.shape.split(","):
        n, k = SHAPES[shape]
        for m in (int(v) for v in args.m.split(",")):
            for variant in args.variants.split(","):
                t0 = time.perf_counter()
                cases[shape, m, variant] = build(variant, m, n, k, args.fmt, args.target)
                print(f"built {shape} M={m} {variant} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    best: dict[tuple[str, int, str], float] = {}
    for _ in range(args.rounds):
        for case, (lib, tensors) in cases.items():
            sec = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1)(*tensors).mean  # type: ignore[attr-defined]
            best[case] = min(best.get(case, sec), sec)
    print(f"fmt={args.fmt or 'f32'} target={args.target}, best of {args.rounds} rounds, "
          f"{os.environ['TVM_NUM_THREADS']} threads (ms; x = time / the same variant's M=1)")
    for (shape, m, variant), sec in best.items():
        base = best.get((shape, 1, variant), sec)
        print(f"  {shape:8} M={m:<3} {variant:5} {sec * 1e3:9.3f} ms  x{sec / base:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
