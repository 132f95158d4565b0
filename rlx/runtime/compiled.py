"""The compiled engine: prefill and decode graphs lowered into one TVM module, run by the Relax VM.

Both graphs (dynamic SEQ prefill, dynamic PAST_SEQ decode; batch 1, last-token logits, KV cache
exported) are built and rewritten by passes exactly as the reference engine's, lowered into ONE
IRModule (functions `prefill` and `decode`, shared kernels) and compiled once. Weights are
uploaded once and shared by both functions.

Weights: whatever the graph computes from weights alone (derived params, the q|k|v and gate|up
concats of the fusion passes) is computed once on the host here, not per call in a kernel.

KV cache, first version: the cache lives on the device between steps as the `present_*`
arrays the functions return, fed back as `past_*`; each step's graph concatenates the new K/V
onto the old (a fresh allocation per layer per step, O(T) copy per token). Preallocated
in-place cache buffers are the next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

from rlx.compiler.pipeline import PassReport
from rlx.compiler.profile import Profile
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.runtime.reference import WeightCache, reference_pipelines
from rlx.targets.build import build
from rlx.targets.lower import Signature, lower, param_keys
from rlx.targets.presets import resolve_target

# device kind of a target -> the TVM device its module runs on
DEVICES: dict[str, Callable[[int], tvm.runtime.Device]] = {"cpu": tvm.cpu, "cuda": tvm.cuda, "metal": tvm.metal}


class CompiledEngine:
    """The Engine protocol (`prefill`, `step`) over a module compiled for a local device.

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
        if passes is None and profile is not None:
            passes = profile.backend_for(resolved.name).passes
        graphs = reference_pipelines(ckpt, flow, passes=passes, profile=profile)
        self.reports: dict[str, PassReport] = {mode: report for mode, (_, report) in graphs.items()}
        t0 = time.perf_counter()
        self.lowered = lower({mode: hir for mode, (hir, _) in graphs.items()})
        self.signatures: dict[str, Signature] = self.lowered.signatures
        self.built = build(self.lowered.mod, resolved)
        self.compile_seconds = time.perf_counter() - t0
        self._vm = relax.VirtualMachine(self.built.executable, self.device)
        self._weights = self._upload(WeightCache(ckpt))
        self._kv: dict[str, tvm.runtime.Tensor] = {}
        self._pos = 0

    def _upload(self, stored: WeightCache) -> dict[str, tvm.runtime.Tensor]:
        """Every distinct weight param of both functions, computed on the host and put on the
        device once (the float32 host copies go when `stored` does)."""
        specs = param_keys(list(self.lowered.signatures.values()))
        stored.preload([name for spec in specs.values() for name in spec.stored])
        return {key: tvm.runtime.tensor(spec.materialize(stored), self.device) for key, spec in specs.items()}

    def _call(self, sig: Signature, feeds: dict[str, np.ndarray | tvm.runtime.Tensor]) -> dict[str, tvm.runtime.Tensor]:
        args = []
        for name, _ in sig.inputs:
            value = feeds[name]
            args.append(value if isinstance(value, tvm.runtime.Tensor) else tvm.runtime.tensor(value, self.device))
        args.extend(self._weights[p.key] for p in sig.params)
        return dict(zip(sig.outputs, self._vm[sig.function](*args), strict=True))

    def _run(self, function: str, ids: list[int]) -> np.ndarray:
        n = len(ids)
        if self._pos + n > self.max_seq:
            raise RunError(f"{self._pos + n} positions exceed the context of {self.max_seq}")
        feeds: dict[str, np.ndarray | tvm.runtime.Tensor] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "positions": np.arange(self._pos, self._pos + n, dtype=np.int64)[None, :],
        }
        feeds.update({k.replace("present_", "past_"): v for k, v in self._kv.items()})
        out = self._call(self.signatures[function], feeds)
        self._kv = {k: v for k, v in out.items() if k.startswith("present_")}
        self._pos += n
        return out["logits"].numpy()[0, -1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        if not ids:
            raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
        self._kv, self._pos = {}, 0
        return self._run("prefill", ids)

    def step(self, token: int) -> np.ndarray:
        if not self._kv:
            raise RunError("step() before prefill()")
        return self._run("decode", [token])
