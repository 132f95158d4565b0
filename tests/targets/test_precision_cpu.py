"""An f16 tiny Gemma through the TVM lowering and the CPU build: f16 weights in the calling
convention (cast at load time, half the bytes), our contraction schedule still applied to the
f32-accumulating kernels, and logits that match the f16 interpreter.

Tolerance: the rounding bound of tests/passes/test_precision.py (C * u * (L + 2) * max|logit|,
u = 2^-11). The compiled module and the interpreter are two f16 implementations: they round at
the same points, but their float32 sums run in different orders, so now and then one side's
value lands on the other side of an f16 rounding boundary and that 1-ulp difference propagates.
Measured on this graph: 1.4e-3 x max|logit| (2.9u) between them, and each within 4u of the f32
graph; the bound at L = 4 is 24u.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.compiler.graphs import run_pipeline as optimize
from rlx.compiler.profile_toml import parse_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.targets.build import build
from rlx.targets.kernels import CONTRACTIONS
from rlx.targets.lower import lower_hir
from tests.passes.test_precision import PROMPT, assert_within_bound, bound

Ckpt = Callable[[str], Path]


def test_f16_model_compiles_with_f16_weights_and_matches_the_interpreter(tiny_ckpt: Ckpt) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    weights = WeightCache(ckpt.weights)
    built_graph = GemmaFlow(ckpt.config, ckpt.weights.shape).prefill(len(PROMPT)).build()

    def graph(compute: str) -> HIR:
        return optimize(built_graph, "prefill", parse_profile(f'[precision]\ncompute = "{compute}"\n'),
                        config=ckpt.config)[0]

    h = graph("f16")
    lowered = lower_hir(h, "main")
    sig = lowered.signatures["main"]
    matrices = [p for p in sig.params if p.type.rank >= 2]
    assert matrices and all(p.type.dtype is DType.F16 for p in matrices)  # every matmul weight
    assert {p.type.dtype for p in sig.params if p.type.rank == 1} == {DType.F32}  # norm weights (mixed=auto)
    assert all(p.materialize(weights).dtype == np.float16 for p in matrices)  # what an artifact stores
    f32_bytes = sum(p.materialize(weights).nbytes for p in lower_hir(graph("f32"), "main").signatures["main"].params)
    f16_bytes = sum(p.materialize(weights).nbytes for p in sig.params)
    assert f16_bytes < 0.51 * f32_bytes

    built = build(lowered.mod, "cpu")
    for gv, func in built.scheduled.functions_items():
        script = func.script() if isinstance(func, tvm.tirx.PrimFunc) else ""
        if any(f'"{c}"' in script for c in CONTRACTIONS):
            assert built.schedules[gv.name_hint] == "contraction", gv.name_hint  # found despite the casts
    assert "none" not in built.schedules.values()

    feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(len(PROMPT))[None]}
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.asarray(feeds[name], t.dtype.numpy), dev) for name, t in sig.inputs]
    args += [tvm.runtime.tensor(p.materialize(weights), dev) for p in sig.params]
    out = VirtualMachine(built.executable, dev)["main"](*args)
    logits = (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()[0]
    ref = Interpreter(h, weights).run(feeds)["logits"][0]
    assert logits.dtype == np.float32
    assert_within_bound(logits, ref, "f16", ckpt.config.num_layers)
    assert_within_bound(logits, Interpreter(built_graph, weights).run(feeds)["logits"][0], "f16",
                        ckpt.config.num_layers)


@pytest.mark.parametrize("compute", ["f16", "bf16"])
def test_fused_low_precision_engine_with_kv_cache_matches_the_interpreter(compute: str, tiny_ckpt: Ckpt) -> None:
    """The default (fused) pipeline plus `[precision]`: attention accumulates in f32, the KV
    cache buffers are in the compute dtype, prefill + 4 decode steps stay within the rounding
    bound of the same graphs interpreted (teacher-forced on the interpreter's tokens)."""
    from rlx.compiler.compiled_engine import CompiledEngine
    from rlx.compiler.engines import reference_engine

    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    profile = parse_profile(f'[precision]\ncompute = "{compute}"\n')
    ref, ours = reference_engine(ckpt, profile=profile), CompiledEngine(ckpt, profile=profile)
    assert {t.dtype for _, t in ours.signatures["decode"].caches} == {DType.F16 if compute == "f16" else DType.BF16}
    want, got = [ref.prefill(PROMPT)], [ours.prefill(PROMPT)]
    for _ in range(4):
        token = int(np.argmax(want[-1]))
        want.append(ref.step(token))
        got.append(ours.step(token))
    tol = bound(compute, ckpt.config.num_layers, np.stack(want))
    assert float(np.abs(np.stack(got) - np.stack(want)).max()) <= tol  # one row each: no top-1 margin check
