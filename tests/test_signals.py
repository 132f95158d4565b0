"""Ctrl-C and SIGTERM: one line (`rlx: interrupted (...)`), exit 130 / 143, never a traceback,
never an artifact after an interrupt, an earlier artifact left as it was, no leftovers.

Each case starts `rlx` in a child process, waits for a progress line that says it is inside the
phase to interrupt, and sends the signal. Every compile phase (`PHASES`, the compiler's own list)
is interrupted once, and the progress lines show it was that one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rlx.compiler.compile import PHASES
from tests.fixtures.edit import tree_digest
from tests.signal_child import HOLDING

Ckpt = Callable[[str], Path]
COMPILE = ["compile", "--no-cache", "--no-serve"]  # (no serve entries: the same phases, a shorter build)


def _interrupt(args: list[str], when: str, signum: int, env: dict[str, str],
               child: list[str] | None = None) -> tuple[int, str]:
    """Run `rlx ARGS` (through `child`, default `python -m rlx`), send `signum` once a stderr line
    contains `when`; (exit code, stderr)."""
    command = [*(child or [sys.executable, "-m", "rlx"]), *args]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env})
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


def _assert_clean_interrupt(code: int, err: str, signum: int, tmp_path: Path) -> None:
    assert code == 128 + signum, err
    assert err.rstrip().splitlines()[-1] == f"rlx: interrupted ({signal.Signals(signum).name})"
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "an artifact or a temp dir was left"


@pytest.mark.parametrize("phase", PHASES)
def test_interrupted_compile(phase: str, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """Every phase of `rlx.compiler.compile.PHASES`, held open by the child (tests/signal_child.py) so
    the signal lands in it however fast it is here; SIGINT and SIGTERM in turn."""
    signum = (signal.SIGINT, signal.SIGTERM)[PHASES.index(phase) % 2]
    child = [sys.executable, str(Path(__file__).with_name("signal_child.py")), phase]
    code, err = _interrupt(COMPILE + [str(tiny_ckpt("gemma3")), "--out", str(tmp_path / "art")],
                           f"{HOLDING} {phase}", signum, {"PYTHONPATH": str(Path(__file__).parents[1])}, child)
    _assert_clean_interrupt(code, err, signum, tmp_path)
    here = PHASES.index(phase)  # the phases before it finished; it started and never did; none came after
    assert re.findall(r"cpu: (\w+) \.\.\.$", err, re.M) == list(PHASES[:here + 1]), err
    assert re.findall(r"cpu: (\w+) done in", err) == list(PHASES[:here]), err


def test_interrupted_build_for_real(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """Unheld: the signal arrives while TVM's build runs (in C++; the interrupt waits for it)."""
    code, err = _interrupt(COMPILE + [str(tiny_ckpt("gemma3")), "--out", str(tmp_path / "art")],
                           "cpu: build ...", signal.SIGINT, {"RLX_CACHE_DIR": str(tmp_path / "cache")})
    _assert_clean_interrupt(code, err, signal.SIGINT, tmp_path)


def test_interrupted_recompile_keeps_the_earlier_artifact(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    from rlx.compiler.compile import compile_checkpoint

    out = tmp_path / "art"
    compile_checkpoint(tiny_ckpt("gemma3"), ["cpu"], out, max_seq=32, use_cache=False, serve=False)
    before = tree_digest(tmp_path)
    code, err = _interrupt(COMPILE + [str(tiny_ckpt("gemma3")), "--out", str(out)],
                           "cpu: build ...", signal.SIGTERM, {"RLX_CACHE_DIR": str(tmp_path / "cache")})
    assert code == 143 and "Traceback" not in err
    assert tree_digest(tmp_path) == before


def test_interrupted_run(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """During generation (the reference engine: slow enough to be caught mid-way)."""
    code, err = _interrupt(["run", str(tiny_ckpt("gemma3")), "--prompt-ids", "2,5,7", "--max-new-tokens", "240",
                            "--logits-out", str(tmp_path / "l.npy")], "running on", signal.SIGINT, {})
    assert code == 130 and err.rstrip().endswith("rlx: interrupted (SIGINT)") and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no logits file, not even a temp one
