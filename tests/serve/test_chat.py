"""`rlx chat` in a pseudo-terminal: two turns (the second reuses the first's pages), /reset, /system,
Ctrl-C mid reply stops the reply and not the program, the context filling drops the oldest turns."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest

REPLY = r"prompt (\d+) tokens, (\d+) reused from the cache( \(stopped\))?"
PROMPT = ">>>"  # prompt-toolkit moves the cursor past the space instead of printing it


def _spawn(ckpt: Path, tmp_path: Path, *flags: str) -> pexpect.spawn:
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, ["-m", "rlx", "chat", str(ckpt), *flags], env=env, encoding="utf-8",
                          timeout=120, cwd=str(Path(__file__).resolve().parents[2]), dimensions=(40, 200))
    child.expect(PROMPT)
    return child


def _turn(child: pexpect.spawn, text: str) -> tuple[int, int, bool]:
    child.sendline(text)
    child.expect(REPLY)
    prompt, reused, stopped = child.match.groups()
    child.expect(PROMPT)
    return int(prompt), int(reused), stopped is not None


def _exit(child: pexpect.spawn) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_turns_reset_and_system(chat_ckpt: Path, tmp_path: Path) -> None:
    child = _spawn(chat_ckpt, tmp_path, "--max-new-tokens", "8")
    first, reused, _ = _turn(child, "hello")
    assert reused == 0
    second, reused, _ = _turn(child, "and you")
    assert second > first + 8 and reused >= 16, "the second turn prefills only what is new"
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect(PROMPT)
    again, _, _ = _turn(child, "hello")
    assert again == first
    child.sendline("/system be brief")
    child.expect("system message set")
    child.expect(PROMPT)
    with_system, _, _ = _turn(child, "hello")
    assert with_system > first  # folded into the first user turn by Gemma's template
    _exit(child)


def test_ctrl_c_stops_the_reply_not_the_program(chat_ckpt: Path, tmp_path: Path) -> None:
    child = _spawn(chat_ckpt, tmp_path, "--max-new-tokens", "240")
    child.sendline("tell me a long story")
    child.expect("tell me a long story")
    import time

    time.sleep(0.4)
    child.sendintr()
    child.expect(REPLY)
    assert child.match.group(3) is not None, "the reply was stopped"
    child.expect(PROMPT)
    _, reused, stopped = _turn(child, "hi")  # still running; the partial reply is in the history
    assert not stopped
    child.sendintr()  # Ctrl-C at the prompt clears the line, nothing more
    child.expect(PROMPT)
    _exit(child)


def test_context_overflow_drops_the_oldest_turns(chat_ckpt: Path, tmp_path: Path) -> None:
    child = _spawn(chat_ckpt, tmp_path, "--max-new-tokens", "100")
    message = "the quick brown fox jumps over the lazy dog " * 3  # ~140 tokens: two never fit in 256
    _turn(child, message)
    child.sendline(message.upper())
    child.expect(r"context full \(256 tokens\): dropped the oldest 1 turn\(s\)")
    child.expect(REPLY)
    assert int(child.match.group(1)) < 256 - 16
    child.expect(PROMPT)
    child.sendline("x" * 300)  # longer than the context on its own
    child.expect("not sent")
    child.expect(PROMPT)
    _exit(child)


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--top-p", "2"], ["--max-batch", "0"]])
def test_bad_flags_fail_before_loading(chat_ckpt: Path, flags: list[str]) -> None:
    from rlx.cli import main

    assert main(["chat", str(chat_ckpt), *flags]) == 2
