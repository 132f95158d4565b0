"""The prefill GEMM's register tile, measured: one linear of gemma-3-270m's shapes built for a
target with several MR x NR tiles, interleaved, as docs/kernels.md reports.

    .venv/bin/python bench/gemm_tiles.py [--target '{"kind": "llvm", "mcpu": "haswell"}']
                                         [--tiles 4x16,4x64,6x16] [--rows 128] [--fmt q4_k --shape down]

(K-quants need K a multiple of 256 since their planes keep the per-256 `d`: `--shape down`.)

Each case is `weight_kernels.contraction` (il16 weights, float or blocks of --fmt) scheduled by
`weight_schedules.Gemm` with the tile forced, compiled alone (no Relax), timed with TVM's
time_evaluator; rounds alternate the cases so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"gate_up": (2 * 2048, 640), "down": (640, 2048), "qkv": (1536, 640)}  # N, K (gemma-3-270m)


def build(target: str, tile: tuple[int, int], rows: int, n: int, k: int, fmt: str) -> object:
    from tvm import te

    from rlx.hir.quant import quant_format
    from rlx.targets import machine, weight_schedules
    from rlx.targets.block_planes import planes_of
    from rlx.targets.presets import resolve_target
    from rlx.targets.weight_kernels import contraction

    resolved = resolve_target(target)
    mr, nr = tile
    x = te.placeholder((1, rows, k), name="x")
    if fmt:
        lines = planes_of(quant_format(fmt)).columns(k) * n // machine.LANES
        w = te.placeholder((lines, machine.LANES), "uint8", name="w")
    else:
        w = te.placeholder((n // machine.LANES, k, machine.LANES), name="w")
    y = contraction(x, w, "il16", fmt, row_tile=mr)
    func = te.create_prim_func([x, w, y])
    params = machine.kernel_params(resolved.target)
    forced = machine.KernelParams(params.isa, mr, nr, params.gemv_groups, params.gemv_chains, params.parallel_min)
    return compile_forced(weight_schedules.Gemm(), func, resolved.target, forced, [x, w, y])


def compile_forced(rule: Any, func: Any, target: Any, forced: Any, tensors: list[Any]) -> tuple[Any, list[Any]]:
    """Schedule `func` with `rule` under `forced` kernel parameters, compile it, and make its
    arguments (`small_m.py` builds its kernels with it too)."""
    import tvm

    from rlx.targets import weight_schedules

    with mock.patch.object(weight_schedules, "kernel_params", lambda _t: forced), target:
        sch = rule.apply(func, target, False)
    assert sch is not None, rule
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target)
    shapes = [([int(d) for d in t.shape], str(t.dtype)) for t in tensors]
    # blocks of zero bytes: valid (f16 scales of 0) and free of denormals, so timing is the kernel's
    return lib, [tvm.runtime.tensor(np.random.rand(*s).astype(d) if d == "float32" else np.zeros(s, d))
                 for s, d in shapes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", help="repeatable; default: cpu")
    p.add_argument("--tiles", default="4x16,4x32,4x64,6x16,2x64")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--shape", default="gate_up", choices=sorted(SHAPES))
    p.add_argument("--fmt", default="", help="a weight format (q4_k, q8_0, ...); empty: float32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm

    n, k = SHAPES[args.shape]
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    cases = {}
    for target in args.target or ["cpu"]:
        for tile in tiles:
            t0 = time.perf_counter()
            cases[target, tile] = build(target, tile, args.rows, n, k, args.fmt)  # type: ignore[arg-type]
            print(f"built {target} {tile[0]}x{tile[1]} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    best: dict[tuple[str, tuple[int, int]], float] = {}
    for _ in range(args.rounds):
        for case, (lib, tensors) in cases.items():
            sec = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=1)(*tensors).mean  # type: ignore[attr-defined]
            best[case] = min(best.get(case, sec), sec)
    flops = 2 * args.rows * n * k
    print(f"{args.shape} N={n} K={k} rows={args.rows} fmt={args.fmt or 'f32'}, best of {args.rounds} rounds")
    for (target, tile), sec in best.items():
        print(f"  {target:40} {tile[0]}x{tile[1]:<3} {sec * 1e3:8.2f} ms  {flops / sec / 1e9:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
