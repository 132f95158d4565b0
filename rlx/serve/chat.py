"""`rlx chat`: talk to a model in the terminal.

Each turn renders the whole conversation with the model's chat template and submits it to the
batched engine, whose prefix cache already holds the earlier turns' pages: only the new text is
prefilled (the reuse is shown after each reply). The reply streams as it is generated (the same
`TextStream` the server uses). Ctrl-C stops the reply, not the program (the partial reply stays
in the history); Ctrl-D or /exit leaves. When the conversation no longer fits the context, the
oldest turns are dropped, with a one-line notice.

Input: prompt-toolkit (history, Alt-Enter / Esc-Enter for a new line) on a terminal, plain lines
otherwise (a pipe).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rlx.runtime.requests import RequestError, SamplingParams
from rlx.serve.backend import Backend, EngineOptions, check_inputs, load_backend
from rlx.serve.chat_template import TemplateError
from rlx.serve.text import TextStream

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit; " \
       "Alt-Enter for a new line, Ctrl-C stops a reply"
MIN_REPLY = 16  # tokens a reply gets at least before old turns are dropped


def _note(message: str) -> None:
    print(f"[rlx] {message}", file=sys.stderr, flush=True)


class Conversation:
    """The messages, the system message apart (so /reset keeps it and /system replaces it)."""

    def __init__(self, system: str | None) -> None:
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def drop_oldest(self) -> bool:
        """Forget the oldest user turn and its reply; False when only the newest is left."""
        if len(self.turns) <= 1:
            return False
        self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]
        return True


def _fit(backend: Backend, chat: Conversation) -> list[int] | None:
    """The prompt ids of the conversation, dropping the oldest turns until a reply fits."""
    dropped = 0
    while True:
        ids = backend.encode_chat(chat.messages())
        if len(ids) + MIN_REPLY <= backend.max_seq:
            if dropped:
                _note(f"context full ({backend.max_seq} tokens): dropped the oldest {dropped} turn(s)")
            return ids
        if not chat.drop_oldest():
            _note(f"this message is {len(ids)} tokens with the template; the context is {backend.max_seq}: "
                  "not sent")
            chat.turns.pop()
            return None
        dropped += 1


async def _reply(backend: Backend, ids: list[int], args: argparse.Namespace) -> tuple[str, str]:
    """Stream one reply to stdout; (its text, how it ended)."""
    params = SamplingParams(max_new_tokens=min(args.max_new_tokens, backend.max_seq - len(ids) + 1),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    before = backend.engine.stats()
    stream = backend.engine.submit(ids, params)
    text = TextStream(backend.decode)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    reason, tokens, start = "length", 0, time.perf_counter()
    try:
        async for event in stream:
            if event.token is not None:
                tokens += 1
                if not (event.finish_reason == "stop" and event.token in backend.eos_ids):
                    sys.stdout.write(text.push(event.token)[0])
                    sys.stdout.flush()
            if event.finished:
                reason = event.finish_reason or reason
        sys.stdout.write(text.finish())
    except asyncio.CancelledError:
        stream.cancel()
        reason = "interrupted"
        task.uncancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    print(flush=True)
    reused = backend.engine.stats().prefix_hits - before.prefix_hits
    seconds = time.perf_counter() - start
    _note(f"{tokens} tokens, {tokens / seconds if seconds else 0:.1f} tok/s; prompt {len(ids)} tokens, "
          f"{reused} reused from the cache{' (stopped)' if reason == 'interrupted' else ''}")
    return text.text, reason


def _line_reader() -> Callable[[], Awaitable[str]]:
    """prompt-toolkit on a terminal, plain lines from a pipe; EOFError at the end, KeyboardInterrupt
    for Ctrl-C at the prompt."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event: Any) -> None:
            event.current_buffer.insert_text("\n")

        history_file = Path.home() / ".cache" / "rlx" / "chat_history"
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history: Any = FileHistory(str(history_file))
        except OSError:
            history = InMemoryHistory()
        session: Any = PromptSession(history=history, key_bindings=bindings)
        return lambda: session.prompt_async(">>> ")

    async def plain() -> str:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return plain


async def _loop(backend: Backend, args: argparse.Namespace) -> None:
    chat = Conversation(args.system)
    read = _line_reader()
    _note(HELP)
    try:
        while True:
            try:
                line = (await read()).strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not line:
                continue
            command, _, rest = line.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                chat.turns.clear()
                _note("conversation reset")
                continue
            if command == "/system":
                chat.system = rest.strip() or None
                _note(f"system message {'set' if chat.system else 'cleared'}")
                continue
            if command.startswith("/") and command[1:].isalpha():
                _note(f"unknown command {command}; {HELP}")
                continue
            chat.turns.append({"role": "user", "content": line})
            try:
                ids = _fit(backend, chat)
            except TemplateError as err:
                _note(f"error: {err}")
                chat.turns.pop()
                continue
            if ids is None:
                continue
            try:
                text, _ = await _reply(backend, ids, args)
            except RequestError as err:
                _note(f"error: {err}")
                chat.turns.pop()
                continue
            chat.turns.append({"role": "assistant", "content": text})
    finally:
        await backend.engine.shutdown(0)


def run_chat(model: str | Path, options: EngineOptions, args: argparse.Namespace) -> int:
    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed).validate(2**31 - 1)  # bad flags fail before the load
    check_inputs(model, options)
    backend = load_backend(model, options)
    asyncio.run(_loop(backend, args))
    return 0
