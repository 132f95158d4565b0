"""The artifact directory `rlx compile` writes and `rlx run` loads.

    ARTIFACT/
      manifest.json   format, tool versions, model hash, config, profile, target, entry
                      signatures, symbolic-dim bounds, file names
      <lib>.so|.tar   the compiled module (.tar of objects for cross targets)
      weights.safetensors   every param in the layout the kernels take (derived params materialised)
      hir/            HIR text before and after passes, per entry
      report.json     pass report, kernel list, phase timings

It is written into a hidden temp directory next to the destination and renamed into place
only when complete, so an interrupted or failed compile leaves no artifact behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlx.errors import RlxError

FORMAT = "rlx-artifact"
FORMAT_VERSION = 2  # 2: in-place KV cache buffers (caches, dims in entries)
MANIFEST = "manifest.json"


class ArtifactError(RlxError):
    """An artifact is missing, damaged, or from another rlx / TVM version or target."""


def tool_versions() -> dict[str, str]:
    import tvm

    import rlx

    return {"rlx": rlx.__version__, "tvm": str(tvm.__version__)}


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt so the temp directory is cleaned up like on Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_atomic(dest: Path, populate: Callable[[Path], dict[str, Any]]) -> Path:
    """`populate(tmp)` fills a temp dir and returns the manifest; then it becomes `dest`."""
    def fill(tmp: Path) -> None:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **populate(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    return replace_dir_atomic(dest, fill)


def replace_dir_atomic(dest: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` fills a hidden temp dir next to `dest`, which then replaces `dest` by renames:
    an exception (or SIGTERM) on the way leaves `dest` as it was and no temp dir behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        with _sigterm_as_interrupt():
            fill(tmp)
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not an rlx artifact (no {MANIFEST})",
                            hint="pass a directory written by `rlx compile`, or a checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is damaged: {e}", hint="compile the artifact again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r} v{manifest.get('format_version')} "
                            f"is not {FORMAT} v{FORMAT_VERSION}", hint="compile it again with this rlx")
    return manifest


def check_compatible(manifest: dict[str, Any], artifact: Path, *, runnable_targets: tuple[str, ...]) -> None:
    """Refuse artifacts from another rlx / TVM version, or for a target this machine cannot run."""
    built = manifest.get("versions", {})
    target = manifest.get("target", {}).get("name")
    for tool, version in tool_versions().items():
        if built.get(tool) != version:
            raise ArtifactError(f"{artifact} was compiled with {tool} {built.get(tool)}, this is {tool} {version}",
                                hint=f"recompile: rlx compile CHECKPOINT --target {target}")
    if target not in runnable_targets:
        raise ArtifactError(f"{artifact} is compiled for target {target!r}, which cannot run here",
                            hint=f"targets that run on this machine: {', '.join(runnable_targets)}")
