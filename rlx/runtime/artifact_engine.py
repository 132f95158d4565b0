"""Run a compiled artifact directory (what `rlx compile` wrote): no checkpoint, no compiler.

The manifest gives each entry's calling convention (inputs, then weight params by key, then
outputs); the weights file holds every param already in the kernels' layout. The run loop is
`VMEngine`'s, shared with the in-process compile, and like it imports only TVM's runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.frontends.config import GemmaConfig
from rlx.frontends.safetensors_file import DTYPE_NAMES, read_header
from rlx.hir.pass_manager import PassReport
from rlx.hir.tensor_type import TensorType
from rlx.runtime.artifact import check_compatible, read_manifest
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


def load_weights(path: Path, device: tvm.runtime.Device) -> dict[str, tvm.runtime.Tensor]:
    """A safetensors file straight into device tensors, one at a time and never mmapped. On the
    CPU the file is read directly into the tensor's memory (a DLPack view), so the weights are
    held once; elsewhere through one host tensor at a time."""
    out: dict[str, tvm.runtime.Tensor] = {}
    with open(path, "rb") as f:
        header, base = read_header(f)
        for key, info in sorted(header.items()):
            start, end = info["data_offsets"]
            f.seek(base + start)
            tensor = tvm.runtime.empty(info["shape"], DTYPE_NAMES[info["dtype"]], device)
            if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
                view = np.from_dlpack(tensor)
                f.readinto(memoryview(view.reshape(-1).view(np.uint8)))
            else:
                tensor.copyfrom(np.frombuffer(f.read(end - start), dtype=tensor.dtype).reshape(info["shape"]))
            out[key] = tensor
    return out


def runnable_targets() -> tuple[str, ...]:
    """Artifact targets this machine can execute."""
    out = ["cpu"]
    if tvm.cuda(0).exist:
        out += ["cuda", "cuda-sm90"]
    return tuple(out)


class ArtifactEngine(VMEngine):
    def __init__(self, artifact: str | Path) -> None:
        root = Path(artifact)
        manifest = read_manifest(root)
        check_compatible(manifest, root, runnable_targets=runnable_targets())
        self.manifest = manifest
        self.name = manifest["target"]["name"]
        self.device = DEVICES[manifest["target"]["device"]](0)
        self.config = GemmaConfig.from_dict(manifest["config"])
        self.max_seq = int(manifest["max_seq"])
        self.buckets = tuple(manifest.get("prefill_buckets", ()))
        self.signatures = {name: EntrySignature.from_manifest(e) for name, e in manifest["entries"].items()}
        self._vm = VirtualMachine(tvm.runtime.load_module(str(root / manifest["library"])), self.device)
        self._weights = load_weights(root / manifest["weights"], self.device)
        self._set_threads(manifest.get("backend", {}).get("threads"))
        self.reports: dict[str, PassReport] = {}  # the passes ran at compile time: see report.json
        self.report = json.loads((root / "report.json").read_text())
        self._reset()
