"""Progress lines: the CLI shows them (`rlx --quiet` does not), the Python API does not unless
asked (`rlx.compile(..., progress=True)`): a program that imports rlx keeps its stderr."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import rlx
from rlx.cli import main

Ckpt = Callable[[str], Path]


def test_the_api_is_quiet_unless_asked_and_the_cli_quiet_with_quiet(
        tiny_ckpt: Ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, out = str(tiny_ckpt("gemma3")), tmp_path / "art"
    capsys.readouterr()
    assert rlx.compile(ckpt, out=out, max_seq=16) == [out]  # a full build: every phase ran
    assert capsys.readouterr().err == ""

    assert main(["--quiet", "compile", ckpt, "--out", str(out), "--max-seq", "16"]) == 0
    got = capsys.readouterr()
    assert got.err == "" and got.out == f"{out}\n"  # the result still goes to stdout

    assert main(["-q", "run", str(out), "--prompt-ids", "2,5", "--max-new-tokens", "2"]) == 0
    got = capsys.readouterr()
    assert got.err == "" and got.out.strip()

    # the same commands without the switch do report (so the checks above could fail)
    assert main(["compile", ckpt, "--out", str(out), "--max-seq", "16"]) == 0
    assert "[rlx] cpu: compile cache hit" in capsys.readouterr().err
    assert main(["run", str(out), "--prompt-ids", "2,5", "--max-new-tokens", "2"]) == 0
    assert "[rlx] running on cpu" in capsys.readouterr().err
    rlx.compile(ckpt, out=out, max_seq=16, progress=True)
    assert "[rlx] cpu: compile cache hit" in capsys.readouterr().err


def test_progress_shows_every_phase_when_asked(tiny_ckpt: Ckpt, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from rlx.compiler.compile import PHASES, compile_checkpoint
    from rlx.progress import reporting

    with reporting():
        compile_checkpoint(tiny_ckpt("gemma3"), ["cpu"], tmp_path / "art", max_seq=16, use_cache=False)
    err = capsys.readouterr().err
    assert [p for p in PHASES if f"[rlx] cpu: {p} done in" in err] == list(PHASES)
