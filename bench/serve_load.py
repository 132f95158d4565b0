"""Load generator for any OpenAI-compatible server (`rlx serve`, llama.cpp's `llama-server`, vLLM).

    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 [--clients 1,8] [--requests 32]
                                         [--max-tokens 64] [--model NAME] [--api-key KEY] [--json FILE]

For each client count c: c concurrent streaming clients (`/v1/completions`, `stream: true`,
greedy, EOS ignored where the server honours `ignore_eos`, so every request produces max_tokens),
`--requests` requests in all, prompts of mixed lengths (short, medium and long, drawn with a fixed
seed from a word list). Reported, as vLLM's serving benchmark reports them: aggregate output tok/s
(generated tokens of all requests over the wall time from first request to last token), request
throughput, and p50 / p90 / p99 of time to first token (request sent -> first text chunk) and
inter-token latency (between successive chunks of a request, each chunk counting its tokens when
the server streams token ids, else one).

Run it against two servers on the same machine and model for a comparison, e.g. rlx on
`artifacts/gemma-3-270m` and `llama-server -m gemma-3-270m-q4_k_m.gguf -np 8 --cont-batching`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

WORDS = ("the of and to in is that for it as with was on be by at this have from or one had not but what all "
         "were when we there can an your which their said if do will each about how up out them then she many "
         "some so these would other into has more her two like him see time could no make than first been its "
         "who now people my made over did down only way find use may water long little very after words called "
         "just where most know").split()
LENGTHS = {"short": (8, 32), "medium": (96, 192), "long": (384, 768)}  # prompt words


@dataclass
class Result:
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = True
    error: str | None = None


def prompts(n: int, seed: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    kinds = list(LENGTHS)
    out = []
    for i in range(n):
        low, high = LENGTHS[kinds[i % len(kinds)]]
        words = min(rng.randint(low, high), max_words)
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)))
    return out


async def one_request(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Result:
    result = Result()
    start = time.perf_counter()
    last = start
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Result(ok=False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                ids = choice.get("token_ids")
                count = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                if not count:
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.extend([(now - last) / count] * count)
                last = now
                result.tokens += count
    except httpx.HTTPError as err:
        return Result(ok=False, error=f"{type(err).__name__}: {err}")
    return result


async def run_load(url: str, clients: int, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    results: list[Result] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            body = {"prompt": text, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "return_token_ids": True, **({"model": args.model} if args.model else {})}
            results.append(await one_request(http, url + "/v1/completions", body))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    ttft = np.array([r.ttft for r in good if r.ttft is not None]) * 1000
    itl = np.array([x for r in good for x in r.itl]) * 1000

    def pct(values: np.ndarray) -> dict[str, float | None]:
        return {f"p{p}": (round(float(np.percentile(values, p)), 2) if values.size else None) for p in (50, 90, 99)}

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if r.error})[:3], "wall_s": round(wall, 2),
            "output_tok_s": round(tokens / wall, 2) if wall else 0.0, "request_s": round(len(good) / wall, 3),
            "output_tokens": tokens, "ttft_ms": pct(ttft), "itl_ms": pct(itl)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (no /v1)")
    parser.add_argument("--clients", default="1,8", help="concurrent streaming clients, comma-separated")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", help="model name to send (default: none, the server's only one)")
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-words", type=int, default=768, help="cap on prompt length (small contexts)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    texts = prompts(args.requests, args.seed, args.max_prompt_words)
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        row = asyncio.run(run_load(url, clients, texts, args))
        rows.append(row)
        print(f"clients {clients:>3}: {row['output_tok_s']:8.1f} output tok/s  {row['request_s']:.2f} req/s  "
              f"TTFT ms p50/p90/p99 {row['ttft_ms']['p50']}/{row['ttft_ms']['p90']}/{row['ttft_ms']['p99']}  "
              f"ITL ms p50/p90/p99 {row['itl_ms']['p50']}/{row['itl_ms']['p90']}/{row['itl_ms']['p99']}"
              + (f"  ({row['failed']} failed: {row['errors']})" if row["failed"] else ""), flush=True)
    if len(rows) > 1 and rows[0]["output_tok_s"]:
        print(f"aggregate at {rows[-1]['clients']} clients = {rows[-1]['output_tok_s'] / rows[0]['output_tok_s']:.2f}x "
              f"{rows[0]['clients']} client(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": url, "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
