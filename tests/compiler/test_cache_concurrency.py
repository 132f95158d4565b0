"""The compile cache and `--out` under concurrent readers and writers: many processes compile the
same model into one `--out` through a warm cache while others replace the cache entry. Every
process must succeed (no `JSONDecodeError` from a manifest read while another process rewrites
it, no rename onto a directory another process just put there), and what is left is intact:
the `--out` artifact, the cache entry, and no temp directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rlx.compiler.compile import cache_root, compile_checkpoint
from rlx.runtime.artifact import read_manifest, verify_files

Ckpt = Callable[[str], Path]
HITS, HIT_TIMES = 5, 4  # processes compiling through the cache into one --out, and compiles each
REFRESHES, REFRESH_TIMES = 2, 25  # processes replacing the cache entry, and replacements each (cheap)
WORKER = Path(__file__).with_name("cache_worker.py")


def _intact(path: Path) -> None:
    verify_files(path, read_manifest(path), full=True)


def test_concurrent_cache_hits_and_refreshes_into_one_out(tiny_ckpt: Ckpt, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "RLX_CACHE_DIR": str(tmp_path / "cache"), "TVM_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    monkeypatch.setenv("RLX_CACHE_DIR", env["RLX_CACHE_DIR"])
    ckpt = tiny_ckpt("gemma3")
    [first] = compile_checkpoint(ckpt, ["cpu"], tmp_path / "first", max_seq=32)  # warms the cache
    pristine = shutil.copytree(first, tmp_path / "pristine")
    out = tmp_path / "outs" / "shared"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "hit", str(ckpt), str(out), str(HIT_TIMES)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(HITS)]
    procs += [subprocess.Popen([sys.executable, str(WORKER), "refresh", str(pristine), str(REFRESH_TIMES)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for _ in range(REFRESHES)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    failed = [err for code, err in results if code != 0 or "Traceback" in err]
    assert not failed, f"{len(failed)} of {len(procs)} processes failed; the first:\n{failed[0]}"
    assert all("compile cache hit" in err for _, err in results[:HITS])  # none compiled again
    _intact(out)
    [entry] = [p for p in cache_root().iterdir()]
    _intact(entry)
    assert sorted(p.name for p in out.parent.iterdir()) == ["shared"]  # no temp or old copies left
    assert sorted(p.name for p in cache_root().iterdir()) == [entry.name]
