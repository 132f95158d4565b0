"""Run a compiled artifact directory (what `rlx compile` wrote): no checkpoint, no compiler.

The manifest gives each entry's calling convention (inputs, then weight params by key, then
outputs); the weights file holds every param already in the kernels' layout. The run loop is
`VMEngine`'s, shared with the in-process compile, and like it imports only TVM's runtime.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.frontends.config import GemmaConfig
from rlx.frontends.safetensors_file import DTYPE_NAMES, read_header_and_metadata
from rlx.hir.conventions import PagedLayout, PagedPool
from rlx.hir.pass_manager import PassReport
from rlx.hir.tensor_type import TensorType
from rlx.runtime.artifact import (
    MANIFEST,
    RECOMPILE,
    ArtifactError,
    check_compatible,
    check_contract,
    check_weights,
    read_manifest,
    verify_files,
)
from rlx.runtime.paged_vm import PagedVMEngine
from rlx.runtime.vm_engine import DEVICES, VMEngine


@dataclass(frozen=True)
class _Param:
    key: str


@dataclass(frozen=True)
class EntrySignature:
    """`Signature` as the manifest records it (param programs are not needed at run time)."""

    function: str
    inputs: tuple[tuple[str, TensorType], ...]
    params: tuple[_Param, ...]
    outputs: tuple[str, ...]
    caches: tuple[tuple[str, TensorType], ...]
    dims: tuple[str, ...]

    @staticmethod
    def from_manifest(entry: dict) -> EntrySignature:
        def typed(pairs: list[list[str]]) -> tuple[tuple[str, TensorType], ...]:
            return tuple((n, TensorType.parse(t)) for n, t in pairs)

        return EntrySignature(entry["function"], typed(entry["inputs"]), tuple(_Param(k) for k, _ in entry["params"]),
                              tuple(entry["outputs"]), typed(entry["caches"]), tuple(entry["dims"]))


def weights_header(path: Path) -> tuple[dict[str, dict[str, Any]], int, dict[str, str]]:
    """The weights file's tensor table, data offset and `__metadata__`; a damaged header is an
    ArtifactError."""
    try:
        with open(path, "rb") as f:
            header, base, metadata = read_header_and_metadata(f)
        end = max((int(h["data_offsets"][1]) for h in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise ArtifactError(f"{path}: unreadable safetensors header ({e})", hint=RECOMPILE) from None
    if base + end > path.stat().st_size:
        raise ArtifactError(f"{path} is truncated: its header describes {base + end} bytes, the file has "
                            f"{path.stat().st_size}", hint=RECOMPILE)
    return header, base, metadata


def load_weights(path: Path, header: Mapping[str, Mapping[str, Any]], base: int,
                 device: tvm.runtime.Device) -> dict[str, tvm.runtime.Tensor]:
    """A safetensors file (its checked `weights_header`) straight into device tensors, one at a
    time and never mmapped. On the CPU the file is read directly into the tensor's memory (a
    DLPack view), so the weights are held once; elsewhere through one host tensor at a time."""
    out: dict[str, tvm.runtime.Tensor] = {}
    with open(path, "rb") as f:
        for key, info in sorted(header.items()):
            start, end = info["data_offsets"]
            f.seek(base + start)
            tensor = tvm.runtime.empty(info["shape"], DTYPE_NAMES[info["dtype"]], device)
            if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
                view = np.from_dlpack(tensor)
                f.readinto(view.reshape(-1).view(np.uint8).data)
            else:
                tensor.copyfrom(np.frombuffer(f.read(end - start), dtype=tensor.dtype).reshape(info["shape"]))
            out[key] = tensor
    return out


def can_run(device: str, local: bool) -> bool:
    """Whether a module for `device` runs on this machine (a CPU one only if built for this
    host, not cross-compiled; a CUDA one where a GPU is)."""
    return (device == "cpu" and local) or (device == "cuda" and bool(tvm.cuda(0).exist))


class ArtifactEngine(VMEngine):
    """Run an artifact directory; `verify` hashes its files in full (default: sizes, quick digests
    and the weights header against the manifest, see `rlx.runtime.artifact`)."""

    def __init__(self, artifact: str | Path, *, verify: bool = False) -> None:
        root = Path(artifact)
        manifest = read_manifest(root)
        check_compatible(manifest, root, runnable=lambda t: t["device"] in DEVICES and can_run(t["device"], t["local"]))
        verify_files(root, manifest, full=verify)
        header, base, metadata = weights_header(root / manifest["weights"])
        check_weights(root, manifest, header, DTYPE_NAMES)
        self.manifest = manifest
        self.name = manifest["target"]["name"]
        self.device = DEVICES[manifest["target"]["device"]](0)
        self.config = GemmaConfig.from_dict(manifest["config"], source=str(root / MANIFEST))
        check_contract(root, manifest, metadata)  # after the checks that name a bad value more precisely
        self.max_seq = manifest["max_seq"]
        self.buckets = tuple(manifest["prefill_buckets"])
        self.signatures = {name: EntrySignature.from_manifest(e) for name, e in manifest["entries"].items()}
        self._vm = VirtualMachine(_load_library(root / manifest["library"]), self.device)
        self._weights = load_weights(root / manifest["weights"], header, base, self.device)
        self._set_threads(manifest["backend"]["threads"])
        self.reports: dict[str, PassReport] = {}  # the passes ran at compile time: see report.json
        self._reset()

    def paged_model(self, num_pages: int, page_size: int | None = None) -> PagedVMEngine:
        """The artifact's batched engine (its `step*` entries, manifest "paged") over the weights
        this engine loaded, with pools of `num_pages` pages; the page size is compiled in."""
        paged = self.manifest.get("paged")
        if paged is None:
            raise ArtifactError(f"{self.manifest['target']['name']} artifact has no paged step entries (compiled "
                                "with --no-serve, or by an older rlx): it runs `rlx run`, not `rlx serve` or batches",
                                hint=RECOMPILE + ", without --no-serve")
        if page_size is not None and page_size != paged["page_size"]:
            raise ArtifactError(f"this artifact's pages hold {paged['page_size']} positions, not {page_size}",
                                hint=f"drop page_size, or compile again with page size {page_size}")
        layout = PagedLayout(paged["page_size"], paged["max_pages"], tuple(PagedPool(**p) for p in paged["pools"]))
        return PagedVMEngine(name=self.name, vm=self._vm, device=self.device, weights=self._weights,
                             signatures=self.signatures, layout=layout, buckets=tuple(paged["buckets"]),
                             num_pages=num_pages, vocab_size=self.vocab_size)


def _load_library(path: Path) -> tvm.runtime.Module:
    try:
        return tvm.runtime.load_module(str(path))
    except Exception as e:  # noqa: BLE001  (TVM raises its own error types for a bad library)
        raise ArtifactError(f"cannot load the compiled library {path}: {str(e).splitlines()[0] if str(e) else e!r}",
                            hint=RECOMPILE) from None
