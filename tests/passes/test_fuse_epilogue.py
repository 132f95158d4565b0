from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes.fuse_epilogue import FuseEpilogue, FuseLMHeadSoftcap

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %r = input() {"name": "r"} : f32[SEQ, 6]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %y = linear(%x, %w) : f32[SEQ, 6]
  %y1 = scale(%y) {"value": 0.5} : f32[SEQ, 6]
  %y2 = add(%r, %y1) : f32[SEQ, 6]
  %y3 = softcap(%y2) {"cap": 30.0} : f32[SEQ, 6]
  return out=%y3
}
"""

AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %r = input() {"name": "r"} : f32[SEQ, 6]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %y.epilogue = linear_epilogue(%x, %w, %r) {"steps": ["scale=0.5", "add", "softcap=30.0"]} : f32[SEQ, 6]
  return out=%y.epilogue
}
"""


def test_golden() -> None:
    assert_golden(FuseEpilogue(), BEFORE, AFTER)


def test_numbers() -> None:
    before = hir(BEFORE)
    result = FuseEpilogue().run(before)
    assert result.stats == {"hits.epilogue": 1, "misses.epilogue": 0}
    assert_same_numbers(before, result.hir, env={"SEQ": 3})


LM_HEAD = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %w = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : f32[9, 4]
  %logits = linear(%x, %w) : f32[SEQ, 9]
  %capped = softcap(%logits) {"cap": 30.0} : f32[SEQ, 9]
  return logits=%capped
}
"""

LM_HEAD_AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %w = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : f32[9, 4]
  %logits.epilogue = linear_epilogue(%x, %w) {"steps": ["softcap=30.0"]} : f32[SEQ, 9]
  return logits=%logits.epilogue
}
"""


def test_lm_head_softcap_golden_and_numbers() -> None:
    assert_golden(FuseLMHeadSoftcap(), LM_HEAD, LM_HEAD_AFTER)
    result = FuseLMHeadSoftcap().run(hir(LM_HEAD))
    assert result.stats == {"hits.lm-head-softcap": 1, "misses.lm-head-softcap": 0}
    assert_same_numbers(hir(LM_HEAD), result.hir, env={"SEQ": 2})


def test_lm_head_softcap_miss() -> None:
    text = LM_HEAD.replace("%capped = softcap(%logits)", "%g = gelu_tanh(%logits) : f32[SEQ, 9]\n  %capped = softcap(%g)")
    assert [m.node for m in FuseLMHeadSoftcap().run(hir(text)).misses] == ["capped"]


STEPS = [(Op.SCALE, {"value": 1.5}), (Op.SOFTCAP, {"cap": 5.0}), (Op.GELU_TANH, {}), (Op.ADD, {}), (Op.MUL, {})]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(len(STEPS))), min_size=0, max_size=6))
def test_property_chains(chain: list[int]) -> None:
    h = HIR("chain")
    t = TensorType(DType.F32, (sym(SEQ), 3))
    y = h.add(Op.LINEAR, [h.input("x", TensorType(DType.F32, (sym(SEQ), 4))), h.param("w", TensorType(DType.F32, (3, 4)))])
    for k, i in enumerate(chain):
        op, attrs = STEPS[i]
        args = [y, h.input(f"o{k}", t)] if op in (Op.ADD, Op.MUL) else [y]
        y = h.add(op, args, attrs)
    h.set_output("y", y)
    result = FuseEpilogue(max_steps=4).run(h)
    assert result.stats["hits.epilogue"] == (1 if chain else 0)
    assert_same_numbers(h, result.hir, env={"SEQ": 2})
