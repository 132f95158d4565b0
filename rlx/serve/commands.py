"""`rlx serve` and `rlx chat`: their flags and entry points (imported by rlx.cli; the server and
chat modules load only when their command runs)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rlx.errors import RlxError


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint (HF directory or .gguf) or an artifact from rlx compile")
    p.add_argument("--target", default="reference", choices=("reference", "cpu"),
                   help="reference (numpy interpreter) or cpu (a checkpoint is compiled through the compile "
                        "cache first); an artifact runs on its own target")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together in one step")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--kv-pages", type=int, help="KV-cache pages in the pool (default: room for --max-batch "
                                                   "sequences of 2048 positions)")
    pool.add_argument("--kv-memory", type=float, metavar="MB", help="KV-cache pool size as a memory budget in MiB "
                                                                    "(instead of --kv-pages)")
    p.add_argument("--chat-template", metavar="FILE", help="a jinja chat template instead of the model's own")
    p.add_argument("--quantize", metavar="SCHEME", help="a checkpoint's weights: gguf (a GGUF's own blocks), q8, q4, "
                                                        "q4a, none (as rlx compile / run)")


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise RlxError(f"{name} must be >= {minimum}, got {value}", hint=f"e.g. {name} 8")


def _options(args: argparse.Namespace, max_queue: int) -> Any:
    from rlx.serve.backend import EngineOptions

    _positive("--max-batch", args.max_batch)
    _positive("--kv-pages", args.kv_pages)
    if args.kv_memory is not None and not args.kv_memory > 0:  # NaN fails too
        raise RlxError(f"--kv-memory must be a number of MiB > 0, got {args.kv_memory}", hint="e.g. --kv-memory 512")
    return EngineOptions(target=args.target, max_batch=args.max_batch, max_queue=max_queue,
                         kv_pages=args.kv_pages, kv_memory_mb=args.kv_memory, chat_template=args.chat_template,
                         quantize=args.quantize)


def cmd_serve(args: argparse.Namespace) -> int:
    from rlx.serve.server import serve

    _positive("--max-queue", args.max_queue, 0)
    _positive("--port", args.port, 0)
    key = args.api_key if args.api_key is not None else os.environ.get("RLX_API_KEY") or None
    return serve(args.model, _options(args, args.max_queue), host=args.host, port=args.port, api_key=key,
                 allowed_origins=args.allowed_origins or (), served_name=args.served_model_name,
                 grace_s=args.grace)


def cmd_chat(args: argparse.Namespace) -> int:
    from rlx.serve.chat import run_chat

    return run_chat(args.model, _options(args, 4), args)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health "
                                     "(default: $RLX_API_KEY)")
    p.add_argument("--allowed-origins", nargs="*", metavar="ORIGIN", help="CORS origins allowed (e.g. "
                                                                         "http://localhost:3000, or *)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: the "
                                                               "model's file or directory name)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    _engine_flags(p)
    p.add_argument("--system", help="a system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_chat)
