"""A checkpoint compiled in-process with TVM and run by the Relax VM.

Prefill, decode and the bucket entries of `target_graphs` are lowered into ONE IRModule and
compiled once; the weights are uploaded once (whatever a graph computes from weights alone, such
as derived params or the q|k|v and gate|up concats, is computed on the host here, not per call in
a kernel). The run loop and the in-place KV cache are `VMEngine`'s.
"""

from __future__ import annotations

import time

import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.compiler.graphs import target_graphs
from rlx.compiler.profile import Profile
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.pass_manager import PassReport
from rlx.runtime.vm_engine import DEVICES, VMEngine
from rlx.targets.build import build
from rlx.targets.lower import Signature, lower, param_keys
from rlx.targets.presets import resolve_target


class CompiledEngine(VMEngine):
    """Compile a checkpoint in-process for a local device and run it."""

    def __init__(self, ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                 profile: Profile | None = None, target: str = "cpu") -> None:
        resolved = resolve_target(target)
        if not resolved.local and resolved.device == "cpu":
            raise RunError(f"target {target!r} is a cross target: its module cannot run on this machine",
                           hint="compile an artifact (rlx compile CHECKPOINT --target ...) and run it on that machine")
        self.device = DEVICES[resolved.device](0)
        if not self.device.exist:
            raise RunError(f"target {target!r} needs a {resolved.device} device, and this machine has none",
                           hint="run on a machine with that device, or use --target cpu")
        self.name = resolved.name
        self.config = ckpt.config
        self.max_seq = ckpt.config.max_position_embeddings
        graphs = target_graphs(ckpt, target=resolved.name, profile=profile, passes=passes, flow=flow)
        self.reports: dict[str, PassReport] = dict(graphs.reports)
        self.buckets = graphs.buckets
        t0 = time.perf_counter()
        self.lowered = lower(graphs.entries, resolved.device)
        self.signatures: dict[str, Signature] = self.lowered.signatures
        self.built = build(self.lowered.mod, resolved, opt_level=graphs.backend.opt_level)
        self.compile_seconds = time.perf_counter() - t0
        self._vm = VirtualMachine(self.built.executable, self.device)
        self._weights = self._upload(WeightCache(ckpt.weights))
        self._set_threads(graphs.backend.threads)
        self._reset()

    def _upload(self, stored: WeightCache) -> dict[str, tvm.runtime.Tensor]:
        """Every distinct weight param of every function, computed on the host and put on the
        device once (the float32 host copies go when `stored` does)."""
        specs = param_keys(list(self.lowered.signatures.values()))
        stored.preload([name for spec in specs.values() for name in spec.stored])
        return {key: tvm.runtime.tensor(spec.materialize(stored), self.device) for key, spec in specs.items()}
