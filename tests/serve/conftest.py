"""A tiny Gemma 3 checkpoint with a character-level tokenizer that can spell JSON, and a running
`rlx serve` subprocess on it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlx.serve.chat_template import GEMMA_TEMPLATE

VOCAB = 256
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
CHARS = ["\n", *(chr(c) for c in range(32, 127))]


def write_char_tokenizer(directory: Path, *, chat_template: str | None = GEMMA_TEMPLATE) -> None:
    """tokenizer.json: specials, newline and printable ASCII as single-character pieces, then
    <unusedN> specials up to the model's vocabulary; BOS 2 (added by encode, as Gemma's), EOS 1
    (the tiny fixtures' ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    pieces = [*SPECIALS, *CHARS]
    pieces += [f"<unused{i}>" for i in range(VOCAB - len(pieces))]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    special = [p for p in pieces if p.startswith("<") and p.endswith(">") and len(p) > 1]
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in special])
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Gemma 3 (vocab 256, context 256) with the character tokenizer and Gemma's template."""
    from tests.fixtures.tiny import make_tiny_checkpoint

    directory = make_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("serve-tiny"))
    write_char_tokenizer(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(model: Path, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 wait: bool = True) -> Server:
    port = free_port()
    log_path = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "rlx", "serve", str(model), "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=tmp)  # `--target cpu` writes artifacts/NAME here
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 240) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"rlx serve exited {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"rlx serve not ready in {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []
    tmp = tmp_path_factory.mktemp("serve-logs")

    def start(model: Path, *args: str, **kw: object) -> Server:
        server = start_server(model, tmp, *args, **kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
