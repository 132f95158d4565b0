"""`rlx serve` / `rlx chat` refuse bad input before anything loads or binds: exit 2, one message and its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlx.cli import main


@pytest.mark.parametrize("flags", [["--max-batch", "0"], ["--kv-pages", "0"], ["--max-queue", "-1"],
                                   ["--port", "-5"], ["--target", "metal"], ["--kv-memory", "0"],
                                   ["--kv-memory", "nan"], ["--kv-pages", "4", "--kv-memory", "8"]])
def test_bad_serve_flags(chat_ckpt: Path, flags: list[str], capsys) -> None:
    assert main(["serve", str(chat_ckpt), *flags]) == 2
    assert "fix:" in capsys.readouterr().err


def test_missing_model_and_unsafe_template(chat_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__ }}")
    for command in ("serve", "chat"):
        assert main([command, str(chat_ckpt), "--chat-template", str(evil)]) == 2
        assert "refused" in capsys.readouterr().err
