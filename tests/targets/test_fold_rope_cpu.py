"""The `rope_table` kernel compiled for the CPU against the reference interpreter.

Tolerance (as test_cpu.py): both sides float32; the compiled rotation may contract
`x * cos + r * sin` into FMAs and the contractions sum in another order, so we assert rtol 1e-5
with an absolute floor of 1e-5 x max|value| (measured here: ~2e-7 on the rope alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.pass_infra import parse_pipeline
from rlx.hir.pass_manager import PassManager
from rlx.hir.tensor_type import TensorType
from rlx.passes import DEFAULT_PIPELINE
from rlx.passes.fold_rope import FoldRope
from rlx.targets.build import build
from rlx.targets.lower import lower, param_keys
from tests.targets.walks import assert_close

PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]


def _compiled_run(h: HIR, feeds: Mapping[str, np.ndarray],
                  load: Callable[[str], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Lower, build for the CPU and call the graph once (a graph without KV-cache outputs)."""
    lowered = lower({"main": h})
    sig = lowered.signatures["main"]
    assert not sig.caches and not sig.dims
    vm = VirtualMachine(build(lowered.mod, "cpu").executable, tvm.cpu())
    specs = param_keys([sig])
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[name])) for name, _ in sig.inputs]
    args += [tvm.runtime.tensor(specs[p.key].materialize(load)) for p in sig.params] if load else []
    return {name: out.numpy() for name, out in zip(sig.outputs, vm["main"](*args), strict=True)}


def test_kernel_matches_interpreter_and_clamps_out_of_table_positions() -> None:
    h = HIR("ropes")
    x = h.input("x", TensorType(DType.F32, (2, 3, 6, 8)))
    pos = h.input("positions", TensorType(DType.I64, (2, 6)))
    inv = h.add(Op.CONST, attrs={"value": (1.0, 0.3, 0.01, 1e-4)}, type=TensorType(DType.F32, (4,)))
    h.set_output("y", h.add(Op.ROPE, [x, pos, inv]))
    folded = FoldRope().run(h).hir  # static T = 6 positions
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 6, 8)).astype(np.float32),
             "positions": np.asarray([[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]])}
    ref = Interpreter(h).run(feeds)["y"]
    assert_close(_compiled_run(folded, feeds)["y"], ref)
    # a position past the table (a broken contract) reads the last row, never past the buffer
    beyond = {**feeds, "positions": np.asarray([[6, 60, -1, 3, 4, 5], [5, 3, 1, 0, 2, 4]])}
    clamped = {**feeds, "positions": np.asarray([[5, 5, 0, 3, 4, 5], [5, 3, 1, 0, 2, 4]])}
    assert_close(_compiled_run(folded, beyond)["y"], Interpreter(h).run(clamped)["y"])


def test_gemma3_folded_prefill_compiles_to_the_reference(tiny_ckpt: Callable[[str], Path]) -> None:
    """Sliding and full RoPE tables both folded into a static prefill; compiled logits at every
    position equal the unfolded graph's under the interpreter."""
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    graph = GemmaFlow(ckpt.config, ckpt.weights.shape).prefill(len(PROMPT)).build()
    folded, report = PassManager(parse_pipeline(DEFAULT_PIPELINE)).run(graph)
    assert {k: v for r in report.records for k, v in r.stats.items()}["tables"] == 2
    weights = WeightCache(ckpt.weights)
    feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(len(PROMPT))[None]}
    ref = Interpreter(graph, weights).run(feeds)["logits"]
    assert_close(_compiled_run(folded, feeds, weights)["logits"], ref)
