"""The whole default pipeline on every tiny Gemma family: numbers unchanged, graph smaller, clean.

Tolerance: fusion only regroups the same float32 operations (the fused attention and epilogue
kernels in the interpreter compute the unfused chain), so outputs agree to ~1e-6; we assert
rtol 1e-5 with an absolute floor of 1e-5 x max|value|.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.interpreter import Interpreter
from rlx.hir.pass_infra import parse_pipeline
from rlx.hir.pass_manager import PassManager
from rlx.passes import DEFAULT_PIPELINE
from tests.fixtures.tiny import FAMILIES

PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]


def _feeds(hir: object, mode: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if mode == "prefill":
        return {"input_ids": np.asarray([PROMPT]), "positions": np.arange(len(PROMPT))[None]}
    feeds = {"input_ids": np.asarray([[5]]), "positions": np.asarray([[len(PROMPT)]])}
    for name, node in hir.inputs.items():  # type: ignore[attr-defined]
        if name.startswith("past_"):
            shape = [len(PROMPT) if not isinstance(d, int) else d for d in node.type.shape]
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_pipeline_keeps_numbers(family: str, mode: str, tiny_ckpt: Callable[[str], Path]) -> None:
    ckpt = open_checkpoint(tiny_ckpt(family))
    flow = GemmaFlow(ckpt.config, ckpt.weights.shape).export_kv()
    hir = (flow.prefill().dynamic_seq() if mode == "prefill" else flow.decode().dynamic_past()).build()
    fused, report = PassManager(parse_pipeline(DEFAULT_PIPELINE), assert_clean=True).run(hir)
    assert len(fused) < len(hir)
    stats = {k: v for r in report.records for k, v in r.stats.items()}
    layers = ckpt.config.num_layers
    assert stats["hits.attention"] == layers and stats["hits.geglu"] >= layers  # PLE gates are GeGLUs too
    assert stats["hits.gate-up"] == layers and stats["hits.add-norm"] >= layers
    assert fused.op_counts().get("softmax", 0) == 0 and fused.op_counts().get("gelu_tanh", 0) == 0
    weights = WeightCache(ckpt.weights)
    feeds = _feeds(hir, mode, np.random.default_rng(0))
    ref, out = Interpreter(hir, weights).run(feeds), Interpreter(fused, weights).run(feeds)
    assert ref.keys() == out.keys()
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5 * float(np.abs(ref[name]).max()),
                                   err_msg=name)
