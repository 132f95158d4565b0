"""Outputs that succeed: replacing an earlier artifact, leftovers of runs that died, symlinked and
JSON-target outputs, and reproducible artifacts. (Refused outputs are in the bad-input corpus.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rlx.cli import main
from rlx.compiler.compile import compile_checkpoint
from rlx.outputs import clean_leftovers, replace_dir_atomic
from tests.fixtures.edit import tree_digest

Ckpt = Callable[[str], Path]
DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: no process has it


def _dead_pid() -> int:
    pid = DEAD_PID
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def _owned(path: Path) -> bool:
    return (path / "ours").is_file()


def test_replace_keeps_the_old_output_until_the_new_one_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    replace_dir_atomic(dest, lambda tmp: (tmp / "ours").write_text("1"), owned=_owned, what="--out")

    def failing(tmp: Path) -> None:
        (tmp / "ours").write_text("2")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError):
        replace_dir_atomic(dest, failing, owned=_owned, what="--out")
    assert (dest / "ours").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_dir_atomic(dest, lambda tmp: (tmp / "ours").write_text("3"), owned=_owned, what="--out")
    assert (dest / "ours").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_runs_are_cleaned_and_a_lost_output_restored(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".out.partial-{dead}-abc").mkdir()
    (tmp_path / f".out.partial-{dead}-abc" / "half").write_text("x")
    (tmp_path / f".out.old-{dead}").mkdir()  # died between its two renames: the old output is here
    (tmp_path / f".out.old-{dead}" / "ours").write_text("old")
    (tmp_path / f".out.partial-{os.getpid()}-live").mkdir()  # a live process's: not ours to touch
    (tmp_path / ".other.old-1").mkdir()  # another output's
    clean_leftovers(tmp_path / "out")
    assert (tmp_path / "out" / "ours").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.old-1", f".out.partial-{os.getpid()}-live", "out"]


def test_symlinked_out_replaces_the_directory_it_points_to(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    real = tmp_path / "real"
    compile_checkpoint(tiny_ckpt("gemma1-mqa"), ["cpu"], real, max_seq=32, use_cache=False)
    (tmp_path / "link").symlink_to(real)
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--out", str(tmp_path / "link"), "--max-seq", "16",
                 "--no-cache"]) == 0
    assert (tmp_path / "link").is_symlink() and json.loads((real / "manifest.json").read_text())["max_seq"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .old / .partial left


def test_json_target_compiles_and_runs(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """The README's JSON targets work end to end (a host-CPU llvm dict is local: it runs here)."""
    from tvm.target import codegen

    target = json.dumps({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})
    out = tmp_path / "art"
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--target", target, "--out", str(out),
                 "--max-seq", "32", "--no-cache"]) == 0
    assert main(["run", str(out), "--prompt-ids", "2,5,7", "--max-new-tokens", "2"]) == 0


def _compile_in_child(checkpoint: Path, out: Path, cache: Path) -> None:
    """A fresh process per compile: nothing of the first run's state can leak into the second."""
    env = {**os.environ, "RLX_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "rlx", "compile", str(checkpoint), "--out", str(out), "--max-seq", "32",
                    "--no-cache"], check=True, env=env, capture_output=True)


def test_two_compiles_give_identical_artifacts(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """Weights, HIR dumps and the manifest are byte-identical but for `created` and the library's
    record: TVM 0.27's library differs between builds in the instruction order of one shape
    function (and the build-id hashing it), so its size may match while its hashes do not."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        _compile_in_child(tiny_ckpt("gemma4-moe"), out, tmp_path / "cache")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in ["weights.safetensors", *[f for f in files if f.startswith("hir/")]]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma.pop("created") != "" and mb.pop("created") != ""
    library = ma["library"]
    for m in (ma, mb):
        m["files"].pop(library)
    assert ma == mb
    assert tree_digest(a / "hir") == tree_digest(b / "hir")
