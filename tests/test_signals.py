"""Ctrl-C and SIGTERM: one line (`rlx: interrupted (...)`), exit 130 / 143, never a traceback,
never an artifact after an interrupt, an earlier artifact left as it was, no leftovers.

Each case starts `rlx` in a child process, waits for a progress line that says it is inside the
phase to interrupt, and sends the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.edit import tree_digest

Ckpt = Callable[[str], Path]


def _interrupt(args: list[str], when: str, signum: int, env: dict[str, str]) -> tuple[int, str]:
    """Run `rlx ARGS`, send `signum` once a stderr line contains `when`; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlx", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, **env})
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if when in line:
            time.sleep(0.05)
            proc.send_signal(signum)
            break
    else:
        proc.wait()
        pytest.fail(f"the child never printed {when!r}:\n{''.join(lines)}")
    rest = proc.stderr.read()
    return proc.wait(timeout=120), "".join(lines) + rest


@pytest.mark.parametrize("signum, phase", [
    (signal.SIGINT, "build ..."), (signal.SIGTERM, "build ..."),
    (signal.SIGINT, "graphs ..."), (signal.SIGTERM, "export ..."),
])
def test_interrupted_compile(signum: int, phase: str, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    out = tmp_path / "art"
    code, err = _interrupt(["compile", str(tiny_ckpt("gemma3")), "--out", str(out), "--no-cache"],
                           f"cpu: {phase}", signum, {"RLX_CACHE_DIR": str(tmp_path / "cache")})
    assert code == 128 + signum, err
    assert err.rstrip().splitlines()[-1] == f"rlx: interrupted ({signal.Signals(signum).name})"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "an artifact or a temp dir was left"


def test_interrupted_recompile_keeps_the_earlier_artifact(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    from rlx.compiler.compile import compile_checkpoint

    out = tmp_path / "art"
    compile_checkpoint(tiny_ckpt("gemma3"), ["cpu"], out, max_seq=32, use_cache=False)
    before = tree_digest(tmp_path)
    code, err = _interrupt(["compile", str(tiny_ckpt("gemma3")), "--out", str(out), "--no-cache"],
                           "cpu: build ...", signal.SIGTERM, {"RLX_CACHE_DIR": str(tmp_path / "cache")})
    assert code == 143 and "Traceback" not in err
    assert tree_digest(tmp_path) == before


def test_interrupted_run(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """During generation (the reference engine: slow enough to be caught mid-way)."""
    code, err = _interrupt(["run", str(tiny_ckpt("gemma3")), "--prompt-ids", "2,5,7", "--max-new-tokens", "240",
                            "--logits-out", str(tmp_path / "l.npy")], "running on", signal.SIGINT, {})
    assert code == 130 and err.rstrip().endswith("rlx: interrupted (SIGINT)") and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no logits file, not even a temp one
