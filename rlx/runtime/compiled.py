"""The compiled engine: prefill and decode graphs lowered into one TVM module, run by the Relax VM.

Both graphs (dynamic SEQ prefill, dynamic PAST_SEQ decode; batch 1, last-token logits, KV cache
exported) are built and rewritten by passes exactly as the reference engine's, lowered into ONE
IRModule (functions `prefill` and `decode`, shared kernels) and compiled once. Weights are
uploaded once and shared by both functions; whatever the graph computes from weights alone
(derived params, the q|k|v and gate|up concats of the fusion passes) is computed once on the
host here, not per call in a kernel. The run loop and the in-place KV cache are `VMEngine`'s.
"""

from __future__ import annotations

import time

import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.compiler.pipeline import PassReport
from rlx.compiler.profile import BackendOptions, Profile
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.runtime.prefill_buckets import engine_graphs, profile_buckets
from rlx.runtime.reference import WeightCache, reference_pipelines
from rlx.runtime.vm_engine import DEVICES, VMEngine
from rlx.targets.build import build
from rlx.targets.lower import Signature, lower, param_keys
from rlx.targets.presets import resolve_target


class CompiledEngine(VMEngine):
    """Compile a checkpoint in-process for a local device and run it.

    Graph and pass selection is the reference engine's (`reference_pipelines`: the profile's
    [[layers]], then `passes`, else the profile's `[backend.<target>] passes`, else its per-mode
    pipeline; neither profile nor passes: no passes), so both engines run the same HIR.
    """

    def __init__(self, ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                 profile: Profile | None = None, target: str = "cpu") -> None:
        resolved = resolve_target(target)
        if not resolved.local and resolved.device == "cpu":
            raise RunError(f"target {target!r} is a cross target: its module cannot run on this machine")
        self.device = DEVICES[resolved.device](0)
        if not self.device.exist:
            raise RunError(f"target {target!r} needs a {resolved.device} device, and this machine has none")
        self.name = resolved.name
        self.config = ckpt.config
        self.max_seq = ckpt.config.max_position_embeddings
        backend = profile.backend_for(resolved.name) if profile is not None else BackendOptions()
        if passes is None:
            passes = backend.passes
        graphs = reference_pipelines(ckpt, flow, passes=passes, profile=profile)
        self.reports: dict[str, PassReport] = {mode: report for mode, (_, report) in graphs.items()}
        self.buckets = profile_buckets(profile, self.max_seq)
        t0 = time.perf_counter()
        self.lowered = lower(engine_graphs({mode: hir for mode, (hir, _) in graphs.items()}, self.buckets))
        self.signatures: dict[str, Signature] = self.lowered.signatures
        self.built = build(self.lowered.mod, resolved, opt_level=backend.opt_level)
        self.compile_seconds = time.perf_counter() - t0
        self._vm = VirtualMachine(self.built.executable, self.device)
        self._weights = self._upload(WeightCache(ckpt))
        self._set_threads(backend.threads)
        self._reset()

    def _upload(self, stored: WeightCache) -> dict[str, tvm.runtime.Tensor]:
        """Every distinct weight param of both functions, computed on the host and put on the
        device once (the float32 host copies go when `stored` does)."""
        specs = param_keys(list(self.lowered.signatures.values()))
        stored.preload([name for spec in specs.values() for name in spec.stored])
        return {key: tvm.runtime.tensor(spec.materialize(stored), self.device) for key, spec in specs.items()}
