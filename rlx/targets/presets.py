"""Target presets: one table from a short name to a TVM target (and its host).

A preset is what `--target` names; a TVM target JSON dict (`'{"kind": "llvm", "mcpu": "znver4"}'`)
is accepted too, for anything the table does not cover. TVM 0.27 refuses target strings with
flags, so every target here is a dict. Presets whose dict depends on the machine (`cpu`: the
host's LLVM CPU name and core count) build it when resolved, not at import; the table itself
imports no TVM, so profiles can check target names without loading the compiler.

| preset        | TVM target                                              | runs here         |
|---------------|---------------------------------------------------------|-------------------|
| `cpu`         | llvm, host `mcpu` (e.g. znver5) and `num-cores`         | yes               |
| `cpu-aarch64` | llvm `aarch64-linux-gnu`, generic cortex-a72 + neon     | no (cross)        |
| `cuda`        | cuda `sm_80` (A100 and newer), llvm host                | needs an NVIDIA GPU |
| `cuda-sm90`   | cuda `sm_90` (H100/H200), llvm host                     | needs an NVIDIA GPU |
| `metal`       | metal (Apple GPU), llvm host `arm64-apple-macos`        | needs a Mac       |
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlx.errors import RlxError

if TYPE_CHECKING:
    import tvm

TargetDict = dict[str, Any]


def _host_cores() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def _host_cpu() -> TargetDict:
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": _host_cores()}


@dataclass(frozen=True)
class Preset:
    """`device` picks the pipeline and schedule rules (see `build.BACKENDS`); `local` says whether
    the compiled module can run in this process (the host's own CPU)."""

    name: str
    device: str
    target: Callable[[], TargetDict]
    host: Callable[[], TargetDict] | None = None
    local: bool = False
    about: str = ""


def _fixed(d: TargetDict) -> Callable[[], TargetDict]:
    return lambda: dict(d)


_LLVM_HOST = _fixed({"kind": "llvm"})


def _cuda(arch: str) -> Callable[[], TargetDict]:
    # 48 KiB: the static shared memory every sm_80+ block gets (TVM warns and assumes it if unset)
    return _fixed({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cpu", "cpu", _host_cpu, local=True, about="this machine's CPU (llvm, host mcpu and core count)"),
    Preset("cpu-aarch64", "cpu",
           _fixed({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}),
           about="64-bit ARM Linux (cross-compiled; link and run on the device)"),
    Preset("cuda", "cuda", _cuda("sm_80"), _LLVM_HOST, about="NVIDIA sm_80 (A100; runs on any newer GPU too)"),
    Preset("cuda-sm90", "cuda", _cuda("sm_90"), _LLVM_HOST, about="NVIDIA sm_90 (H100 / H200)"),
    Preset("metal", "metal", _fixed({"kind": "metal"}),
           _fixed({"kind": "llvm", "mtriple": "arm64-apple-macos"}),
           about="Apple GPU (MSL source + arm64 macOS host objects; export as .tar)"),
)}

# TVM target kinds -> the pipeline family a JSON target compiles with
_DEVICE_OF_KIND = {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "metal": "metal"}


@dataclass(frozen=True)
class ResolvedTarget:
    """A preset (or JSON dict) turned into a TVM `Target`, with what the build needs to know."""

    name: str
    device: str
    target: tvm.target.Target
    local: bool


def _from_json(text: str) -> ResolvedTarget:
    import tvm

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RlxError(f"target {text!r} is not valid JSON: {e.msg}",
                       hint='give a preset name or a dict like {"kind": "llvm", "mcpu": "znver4"}') from None
    if not isinstance(spec, dict) or "kind" not in spec:
        raise RlxError(f"target JSON {text!r} must be an object with a \"kind\"",
                       hint='give a dict like {"kind": "llvm", "mcpu": "znver4"}')
    host = spec.pop("host", None)
    device = _DEVICE_OF_KIND.get(spec["kind"])
    if device is None:
        raise RlxError(f"target kind {spec['kind']!r} is not supported",
                       hint=f"use one of the kinds {', '.join(sorted(_DEVICE_OF_KIND))}")
    try:
        target = tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise RlxError(f"TVM rejects target {text!r}: {str(e).splitlines()[0]}",
                       hint="check the target keys against TVM's target kinds") from None
    local = device == "cpu" and "mtriple" not in spec
    return ResolvedTarget(spec["kind"], device, target, local)


def split_targets(text: str) -> list[str]:
    """Comma-separated presets; a JSON target dict (which has commas of its own) is one target."""
    return [text] if text.lstrip().startswith("{") else [t.strip() for t in text.split(",") if t.strip()]


def resolve_target(name_or_json: str) -> ResolvedTarget:
    """A preset name (`cpu`, `cuda`, ...) or a TVM target JSON dict string -> `ResolvedTarget`."""
    import tvm

    text = name_or_json.strip()
    if text.startswith("{"):
        return _from_json(text)
    preset = PRESETS.get(text)
    if preset is None:
        listed = "; ".join(f"{p.name}: {p.about}" for p in PRESETS.values())
        raise RlxError(f"unknown target {name_or_json!r}",
                       hint=f"use a preset ({listed}) or a TVM target JSON dict")
    target = tvm.target.Target(preset.target(), host=preset.host()) if preset.host else \
        tvm.target.Target(preset.target())
    return ResolvedTarget(preset.name, preset.device, target, preset.local)
