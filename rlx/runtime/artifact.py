"""The artifact directory `rlx compile` writes and `rlx run` loads: its format and the checks
made when one is loaded (`rlx.driver.compile` writes it).

    ARTIFACT/
      manifest.json   format, tool versions, model hash, config, profile, target, entry
                      signatures, symbolic-dim bounds, file names
      <lib>.so|.tar   the compiled module (.tar of objects for cross targets)
      weights.safetensors   every param in the layout the kernels take (derived params materialised)
      hir/            HIR text before and after passes, per entry
      report.json     pass report, kernel list, phase timings

It is written into a hidden temp directory next to the destination and renamed into place
only when complete (`rlx.outputs`), so an interrupted or failed compile leaves no artifact behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlx.errors import RlxError
from rlx.version import __version__

FORMAT = "rlx-artifact"
FORMAT_VERSION = 2  # 2: in-place KV cache buffers (caches, dims in entries)
MANIFEST = "manifest.json"


class ArtifactError(RlxError):
    """An artifact is missing, damaged, or from another rlx / TVM version or target."""


def tool_versions() -> dict[str, str]:
    import tvm

    return {"rlx": __version__, "tvm": str(tvm.__version__)}


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
