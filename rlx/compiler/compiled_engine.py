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

from rlx.compiler.graphs import DEFAULT_STEP_BUCKETS, paged_graphs, target_graphs
from rlx.compiler.profile import Profile
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.paged import DEFAULT_PAGE_SIZE
from rlx.frontends.weights import WeightCache
from rlx.hir.pass_manager import PassReport
from rlx.runtime.paged_engine import paged_layout_of
from rlx.runtime.paged_vm import PagedVMEngine
from rlx.runtime.vm_engine import DEVICES, VMEngine
from rlx.targets.build import build
from rlx.targets.lower import Signature, lower_for, param_keys
from rlx.targets.presets import ResolvedTarget, resolve_target


def _local_device(resolved: ResolvedTarget, target: str) -> tvm.runtime.Device:
    """The device a target's module runs on here; a cross target or a missing device is a RunError."""
    if not resolved.local and resolved.device == "cpu":
        raise RunError(f"target {target!r} is a cross target: its module cannot run on this machine",
                       hint="compile an artifact (rlx compile CHECKPOINT --target ...) and run it on that machine")
    device = DEVICES[resolved.device](0)
    if not device.exist:
        raise RunError(f"target {target!r} needs a {resolved.device} device, and this machine has none",
                       hint="run on a machine with that device, or use --target cpu")
    return device


class CompiledEngine(VMEngine):
    """Compile a checkpoint in-process for a local device and run it."""

    def __init__(self, ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                 profile: Profile | None = None, target: str = "cpu") -> None:
        resolved = resolve_target(target)
        self.device = _local_device(resolved, target)
        self.name = resolved.name
        self.config = ckpt.config
        self.max_seq = ckpt.config.max_position_embeddings
        graphs = target_graphs(ckpt, target=resolved.name, profile=profile, passes=passes, flow=flow)
        self.reports: dict[str, PassReport] = dict(graphs.reports)
        self.buckets = graphs.buckets
        t0 = time.perf_counter()
        self.lowered = lower_for(graphs.entries, resolved)
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


def compiled_paged_engine(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, num_pages: int,
                          page_size: int = DEFAULT_PAGE_SIZE, passes: str | None = None,
                          profile: Profile | None = None, target: str = "cpu", max_seq: int | None = None,
                          buckets: tuple[int, ...] = DEFAULT_STEP_BUCKETS,
                          shared: CompiledEngine | None = None) -> PagedVMEngine:
    """The paged step entries (`paged_graphs`, the same profile and passes as `CompiledEngine`)
    compiled in-process into their own module. `shared`: a compiled single-sequence engine of
    the same checkpoint whose uploaded weights are reused where the key and layout agree (the
    step's linears read their weights as prefill's do), so the weights are held once."""
    resolved = resolve_target(target)
    device = _local_device(resolved, target)
    graphs = paged_graphs(ckpt, target=resolved.name, profile=profile, passes=passes, flow=flow,
                          page_size=page_size, max_seq=max_seq, buckets=buckets)
    lowered = lower_for(graphs.entries, resolved)
    backend = profile.backend_for(resolved.name) if profile is not None else None
    built = build(lowered.mod, resolved, opt_level=backend.opt_level if backend else None)
    have = param_keys(list(shared.signatures.values())) if shared is not None else {}
    weights: dict[str, tvm.runtime.Tensor] = {}
    missing = []
    for key, spec in param_keys(list(lowered.signatures.values())).items():
        mine = have.get(key)
        if mine is not None and (mine.layout, mine.physical) == (spec.layout, spec.physical):
            weights[key] = shared._weights[key]  # type: ignore[union-attr]  # `have` is empty without `shared`
        else:
            missing.append(spec)
    if missing:
        stored = WeightCache(ckpt.weights)
        stored.preload([name for spec in missing for name in spec.stored])
        weights.update({spec.key: tvm.runtime.tensor(spec.materialize(stored), device) for spec in missing})
    return PagedVMEngine(name=resolved.name, vm=VirtualMachine(built.executable, device), device=device,
                         weights=weights, signatures=lowered.signatures, layout=paged_layout_of(graphs.graph),
                         buckets=buckets, num_pages=num_pages, vocab_size=ckpt.config.vocab_size)
