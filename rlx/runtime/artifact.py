"""The artifact directory `rlx compile` writes and `rlx run` loads: its format, and the checks made
before one is trusted (`rlx.compiler.compile` writes it).

    ARTIFACT/
      manifest.json   format, tool versions, model hash, config, profile, target, entry
                      signatures, symbolic-dim bounds, file names, sizes and hashes, `created`
      <lib>.so|.tar   the compiled module (.tar of objects for cross targets)
      weights.safetensors   every param in the layout the kernels take (derived params materialised)
      hir/            HIR text before and after passes, per entry
      report.json     pass report, kernel list, phase timings, weights (format and bytes per
                      tensor, bytes a decode step reads)

It is written into a hidden temp directory next to the destination and renamed into place only
when complete (`rlx.outputs`), so an interrupted or failed compile leaves no artifact behind.

Loading checks, in order (`load_checked`): the manifest parses and has every key with the right
type (`SCHEMA`, errors name the key); the format and tool versions match; every file the
manifest lists exists with its recorded size and quick digest (sha256 of its size, first and
last MiB: catches truncation and most damage in milliseconds; `--verify` hashes whole files);
the weights file's header lists exactly the tensors the entries take, each with the dtype,
shape and byte count the manifest declares; the manifest keys the code was compiled for
(`CONTRACT`: max_seq, bounds, entries...) match the digest compile stored in that header.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rlx.digests import digest_edges
from rlx.errors import RlxError
from rlx.hir.tensor_type import TensorType
from rlx.version import __version__

FORMAT = "rlx-artifact"
FORMAT_VERSION = 7  # 3: file sizes / hashes, target.local, created; 4: quantized weights; 5: kernel layouts;
# 6: the weights header records the manifest's contract (`CONTRACT`); 7: K-quant planes keep d and sc factored
MANIFEST = "manifest.json"
_EDGE = 1 << 20  # bytes a quick digest reads from each end of a file
RECOMPILE = "compile the artifact again: rlx compile CHECKPOINT --out DIR"


class ArtifactError(RlxError):
    """An artifact is missing, damaged, or from another rlx / TVM version or target."""


def tool_versions() -> dict[str, str]:
    import tvm

    return {"rlx": __version__, "tvm": str(tvm.__version__)}


def is_artifact_dir(path: Path) -> bool:
    """Whether `path` holds an rlx artifact (any version): what `rlx compile --out` may replace."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---- the manifest's schema: a spec is a type, a tuple of types, [item spec], {key: spec} (fixed
# keys, all required) or {str: spec} (a mapping of any keys) ----

Spec = Any
_TYPE = (str,)
_ENTRY: Spec = {"function": str, "inputs": [[str]], "params": [[str]], "outputs": [str], "caches": [[str]],
                "dims": [str]}
SCHEMA: dict[str, Spec] = {
    "format": str, "format_version": int, "versions": {"rlx": str, "tvm": str}, "created": str,
    "model_hash": str, "config": {str: object}, "target": {"name": str, "device": str, "local": bool, "json": str},
    "entries": {str: _ENTRY}, "layouts": {str: str}, "max_seq": int, "prefill_buckets": [int],
    "backend": {"opt_level": (int, type(None)), "threads": (int, type(None))},
    "library": str, "weights": str, "files": {str: {"bytes": int, "quick": str, "sha256": str}},
    "quantize": {"scheme": str, "group": int, "embed": (str, type(None)), "head": (str, type(None)),
                 "tensors": {str: str}},
}
_KINDS = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object",
          type(None): "null", object: "a value"}


def _describe(spec: Spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, dict):
        return "an object"
    return _KINDS.get(spec, spec.__name__)


def _check(value: Any, spec: Spec, where: str) -> None:
    """Raise ArtifactError naming `where` (a key path) when `value` does not fit `spec`."""
    def bad() -> ArtifactError:
        return ArtifactError(f"{MANIFEST}: key {where} must be {_describe(spec)}, got {value!r:.80}", hint=RECOMPILE)

    if isinstance(spec, list):
        if not isinstance(value, list):
            raise bad()
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise bad()
        if list(spec) == [str]:
            for key, item in value.items():
                _check(item, spec[str], f"{where}.{key}")
            return
        for key, item_spec in spec.items():
            if key not in value:
                raise ArtifactError(f"{MANIFEST}: key {where}.{key} is missing", hint=RECOMPILE)
            _check(value[key], item_spec, f"{where}.{key}")
    elif spec is not object:
        kinds = spec if isinstance(spec, tuple) else (spec,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad()


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The manifest, checked against `SCHEMA` and this rlx's format version."""
    path = Path(artifact) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not an rlx artifact (no {MANIFEST})",
                            hint="pass a directory written by `rlx compile`, or a checkpoint")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is damaged: {e}", hint=RECOMPILE) from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is damaged: not a JSON object", hint=RECOMPILE)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r} v{manifest.get('format_version')} "
                            f"is not {FORMAT} v{FORMAT_VERSION}", hint="compile it again with this rlx")
    for key, spec in SCHEMA.items():
        if key not in manifest:
            raise ArtifactError(f"{MANIFEST}: key {key} is missing", hint=RECOMPILE)
        _check(manifest[key], spec, key)
    for name, entry in manifest["entries"].items():
        for group in ("inputs", "params", "caches"):
            for i, pair in enumerate(entry[group]):
                where = f"entries.{name}.{group}[{i}]"
                if len(pair) != 2:
                    raise ArtifactError(f"{MANIFEST}: key {where} must be [name, type]", hint=RECOMPILE)
                try:
                    TensorType.parse(pair[1])
                except ValueError as e:
                    raise ArtifactError(f"{MANIFEST}: key {where}: {e}", hint=RECOMPILE) from None
    return manifest


def check_compatible(manifest: dict[str, Any], artifact: Path, *,
                     runnable: Callable[[Mapping[str, Any]], bool]) -> None:
    """Refuse artifacts from another rlx / TVM version, or for a target this machine cannot run
    (`runnable(manifest["target"])`)."""
    target = manifest["target"]
    for tool, version in tool_versions().items():
        if manifest["versions"].get(tool) != version:
            raise ArtifactError(f"{artifact} was compiled with {tool} {manifest['versions'].get(tool)}, "
                                f"this is {tool} {version}", hint=f"recompile: rlx compile CHECKPOINT --target "
                                                                  f"{target['name']}")
    if not runnable(target):
        raise ArtifactError(f"{artifact} is compiled for target {target['name']!r}, which cannot run here "
                            f"(device {target['device']}{'' if target['local'] else ', cross-compiled'})",
                            hint="run it where that device is, or compile for this machine: --target cpu")


# ---- the contract: manifest keys the compiled code and weights were built for ----

# What the kernels rely on (the rope tables and KV bounds are sized by max_seq / bounds, the code
# takes entries / layouts / config's shapes...). manifest.json itself is no file the manifest can
# hash, so compile stores a digest of each of these keys in the weights file's header
# (`__metadata__`), which the file's recorded size and digests cover: a hand-edited key (max_seq
# raised past the tables, say) is refused on load instead of running past what was compiled.
CONTRACT = ("config", "entries", "layouts", "bounds", "max_seq", "prefill_buckets", "paged", "quantize", "target",
            "library", "weights")
CONTRACT_METADATA = "rlx.contract"


def contract_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The weights header's `__metadata__` entry for `manifest` (a digest per `CONTRACT` key)."""
    digests = {key: hashlib.sha256(json.dumps(manifest.get(key), sort_keys=True).encode()).hexdigest()[:32]
               for key in CONTRACT}
    return {CONTRACT_METADATA: json.dumps(digests, sort_keys=True)}


def check_contract(artifact: Path, manifest: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """The manifest's `CONTRACT` keys are the ones the artifact was compiled with (`metadata`: the
    weights file's header `__metadata__`)."""
    weights = artifact / manifest["weights"]
    try:
        recorded = json.loads(metadata[CONTRACT_METADATA])
    except (KeyError, ValueError):
        raise ArtifactError(f"{weights} records no manifest digest: the artifact is damaged or not from this rlx",
                            hint=RECOMPILE) from None
    expected = json.loads(contract_metadata(manifest)[CONTRACT_METADATA])
    changed = [key for key in CONTRACT if not isinstance(recorded, dict) or recorded.get(key) != expected[key]]
    if changed:
        raise ArtifactError(f"{artifact / MANIFEST}: key {', '.join(changed)} differs from what the artifact was "
                            f"compiled with (its digest in {manifest['weights']} does not match): the code and "
                            "weights only hold for the compiled values",
                            hint="put the manifest back as compile wrote it, or compile again with the values "
                                 "you want (e.g. rlx compile CHECKPOINT --max-seq N --out DIR)")


# ---- files: sizes and digests ----

def quick_digest(path: Path) -> str:
    """sha256 of the file's size and its first and last MiB (see the module docstring)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    digest_edges(digest, path, _EDGE, _EDGE)
    return digest.hexdigest()


def full_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of one file (`files`)."""
    return {"bytes": path.stat().st_size, "quick": quick_digest(path), "sha256": full_digest(path)}


def verify_files(artifact: Path, manifest: Mapping[str, Any], *, full: bool = False) -> None:
    """Every file the manifest lists exists with its size and quick digest (and, `full`, its sha256)."""
    for name in (manifest["library"], manifest["weights"]):
        if name not in manifest["files"]:
            raise ArtifactError(f"{MANIFEST}: key files.{name} is missing", hint=RECOMPILE)
    for name, record in manifest["files"].items():
        path = artifact / name
        if not path.is_file():
            raise ArtifactError(f"{artifact}: {name} is missing", hint=RECOMPILE)
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ArtifactError(f"{artifact}: {name} has {size} bytes, the manifest says {record['bytes']} "
                                f"({'truncated' if size < record['bytes'] else 'grown'})", hint=RECOMPILE)
        if quick_digest(path) != record["quick"] or (full and full_digest(path) != record["sha256"]):
            raise ArtifactError(f"{artifact}: {name} does not match the hash in the manifest (damaged or changed)",
                                hint=RECOMPILE)


def check_weights(artifact: Path, manifest: Mapping[str, Any], header: Mapping[str, Mapping[str, Any]],
                  dtype_names: Mapping[str, str]) -> None:
    """The weights file's header (`safetensors_file.read_header`) holds exactly the params the
    entries take, each with the declared dtype, shape and byte count."""
    declared: dict[str, TensorType] = {}
    for entry in manifest["entries"].values():
        for key, text in entry["params"]:
            declared[key] = TensorType.parse(text)
    where = f"{artifact / manifest['weights']}"
    missing = sorted(set(declared) - set(header))
    if missing:
        raise ArtifactError(f"{where} lacks {len(missing)} tensor(s) the code takes: {', '.join(missing[:3])}",
                            hint=RECOMPILE)
    for key, t in declared.items():
        info = header[key]
        shape = [int(d) for d in t.shape]  # type: ignore[arg-type]  # params are static
        start, end = info["data_offsets"]
        itemsize = t.dtype.itemsize
        if dtype_names.get(info["dtype"]) != str(t.dtype.numpy) or list(info["shape"]) != shape \
                or end - start != itemsize * math.prod(shape):
            raise ArtifactError(f"{where}: tensor {key} is {info['dtype']} {list(info['shape'])} "
                                f"({end - start} bytes), the code takes {t}", hint=RECOMPILE)
