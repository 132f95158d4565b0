"""quantize{scheme=...}: which weights it retypes (golden text, per-layer / embed / head overrides,
a tied head, GGUF stored types), its errors, what the interpreter computes with the result (both
ways it gets blocks: quantized from float32 here, or a GGUF's stored blocks), and how it composes
with the shared-input fusions and constant folding.

Numeric tolerances:
- "exact semantics" (rtol = atol = 1e-5): a quantized graph against the float graph whose weights
  are the dequantized blocks. Both multiply the same float32 operand values accumulating in
  float32; only the order BLAS sums a row of K products in may differ (transposed or concatenated
  operands), which moves a sum by ~sqrt(K) u of its terms' magnitudes (u = 2^-24; K <= 256 here:
  ~1e-6), K u = 1.5e-5 at the very worst. Measured: identical bits.
- "close to float" (a relative Frobenius error of the logits): see test_quantized_logits_stay_near_the_float_ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.pass_infra import PassError, format_pipeline, parse_pipeline
from rlx.hir.quant import QuantFormat, QuantizedArray, quant_format
from rlx.hir.tensor_type import TensorType
from rlx.hir.text import print_hir
from rlx.hir.verify import verify
from rlx.passes.fold_constants import FoldConstants
from rlx.passes.fuse_matmuls import FuseGateUp, FuseQKV
from rlx.passes.quantize import Quantize

from .harness import assert_golden, hir, random_feeds, random_weights

TWIN = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1}
ENV = {"SEQ": 5}

# An embedding, a layer-0 attention's q / k / v, a layer-1 MLP's gate / up, a final norm and an
# untied LM head; each param says how a GGUF would store it (`stored`) and, inside the layer
# stack, its `layer`.
BEFORE = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : f32[16, 64] meta {"stored": "Q8_0"}
  %wq = param() {"name": "layers.0.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %wk = param() {"name": "layers.0.k_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %wv = param() {"name": "layers.0.v_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 0, "stored": "Q8_0"}
  %wg = param() {"name": "layers.1.gate_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 1, "stored": "Q4_1"}
  %wu = param() {"name": "layers.1.up_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 1, "stored": "F32"}
  %nw = param() {"name": "norm.weight", "scale": 1.0, "shift": 0.0} : f32[64] meta {"stored": "F32"}
  %head = param() {"name": "lm_head.weight", "scale": 1.0, "shift": 0.0} : f32[16, 64] meta {"stored": "Q8_0"}
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  %q = linear(%e, %wq) : f32[1, SEQ, 64] meta {"layer": 0, "role": "q"}
  %k = linear(%e, %wk) : f32[1, SEQ, 64] meta {"layer": 0, "role": "k"}
  %v = linear(%e, %wv) : f32[1, SEQ, 64] meta {"layer": 0, "role": "v"}
  %qk = add(%q, %k) : f32[1, SEQ, 64] meta {"layer": 0}
  %h0 = add(%qk, %v) : f32[1, SEQ, 64] meta {"layer": 0}
  %g = linear(%h0, %wg) : f32[1, SEQ, 64] meta {"layer": 1, "role": "gate"}
  %u = linear(%h0, %wu) : f32[1, SEQ, 64] meta {"layer": 1, "role": "up"}
  %h1 = mul(%g, %u) : f32[1, SEQ, 64] meta {"layer": 1}
  %n = rms_norm(%h1, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 64]
  %logits = linear(%n, %head) : f32[1, SEQ, 16] meta {"role": "head"}
  return logits=%logits
}
"""

# q4: every 2-D weight a linear or the embedding reads becomes q4_0 (meta kept); the norm stays.
# (A retyped param is a replaced node: the text form prints it just before its first reader.)
AFTER_Q4 = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %nw = param() {"name": "norm.weight", "scale": 1.0, "shift": 0.0} : f32[64] meta {"stored": "F32"}
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : q4_0[16, 64] meta {"stored": "Q8_0"}
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  %wq = param() {"name": "layers.0.q_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %q = linear(%e, %wq) : f32[1, SEQ, 64] meta {"layer": 0, "role": "q"}
  %wk = param() {"name": "layers.0.k_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %k = linear(%e, %wk) : f32[1, SEQ, 64] meta {"layer": 0, "role": "k"}
  %qk = add(%q, %k) : f32[1, SEQ, 64] meta {"layer": 0}
  %wv = param() {"name": "layers.0.v_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 0, "stored": "Q8_0"}
  %v = linear(%e, %wv) : f32[1, SEQ, 64] meta {"layer": 0, "role": "v"}
  %h0 = add(%qk, %v) : f32[1, SEQ, 64] meta {"layer": 0}
  %wg = param() {"name": "layers.1.gate_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 1, "stored": "Q4_1"}
  %g = linear(%h0, %wg) : f32[1, SEQ, 64] meta {"layer": 1, "role": "gate"}
  %wu = param() {"name": "layers.1.up_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 1, "stored": "F32"}
  %u = linear(%h0, %wu) : f32[1, SEQ, 64] meta {"layer": 1, "role": "up"}
  %h1 = mul(%g, %u) : f32[1, SEQ, 64] meta {"layer": 1}
  %n = rms_norm(%h1, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 64]
  %head = param() {"name": "lm_head.weight", "scale": 1.0, "shift": 0.0} : q4_0[16, 64] meta {"stored": "Q8_0"}
  %logits = linear(%n, %head) : f32[1, SEQ, 16] meta {"role": "head"}
  return logits=%logits
}
"""

# gguf: each weight keeps its stored block type; the F32-stored up projection stays float
AFTER_GGUF = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %wu = param() {"name": "layers.1.up_proj.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64] meta {"layer": 1, "stored": "F32"}
  %nw = param() {"name": "norm.weight", "scale": 1.0, "shift": 0.0} : f32[64] meta {"stored": "F32"}
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : q8_0[16, 64] meta {"stored": "Q8_0"}
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  %wq = param() {"name": "layers.0.q_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %q = linear(%e, %wq) : f32[1, SEQ, 64] meta {"layer": 0, "role": "q"}
  %wk = param() {"name": "layers.0.k_proj.weight", "scale": 1.0, "shift": 0.0} : q4_0[64, 64] meta {"layer": 0, "stored": "Q4_0"}
  %k = linear(%e, %wk) : f32[1, SEQ, 64] meta {"layer": 0, "role": "k"}
  %qk = add(%q, %k) : f32[1, SEQ, 64] meta {"layer": 0}
  %wv = param() {"name": "layers.0.v_proj.weight", "scale": 1.0, "shift": 0.0} : q8_0[64, 64] meta {"layer": 0, "stored": "Q8_0"}
  %v = linear(%e, %wv) : f32[1, SEQ, 64] meta {"layer": 0, "role": "v"}
  %h0 = add(%qk, %v) : f32[1, SEQ, 64] meta {"layer": 0}
  %u = linear(%h0, %wu) : f32[1, SEQ, 64] meta {"layer": 1, "role": "up"}
  %wg = param() {"name": "layers.1.gate_proj.weight", "scale": 1.0, "shift": 0.0} : q4_1[64, 64] meta {"layer": 1, "stored": "Q4_1"}
  %g = linear(%h0, %wg) : f32[1, SEQ, 64] meta {"layer": 1, "role": "gate"}
  %h1 = mul(%g, %u) : f32[1, SEQ, 64] meta {"layer": 1}
  %n = rms_norm(%h1, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 64]
  %head = param() {"name": "lm_head.weight", "scale": 1.0, "shift": 0.0} : q8_0[16, 64] meta {"stored": "Q8_0"}
  %logits = linear(%n, %head) : f32[1, SEQ, 16] meta {"role": "head"}
  return logits=%logits
}
"""

WEIGHTS = ("table", "wq", "wk", "wv", "wg", "wu", "nw", "head")


def _types(h: HIR) -> dict[str, str]:
    """The text type of each param of BEFORE, by node id."""
    return {nid: str(h.node(nid).type) for nid in WEIGHTS if nid in h}


def _expect(default: str, **by_id: str) -> dict[str, str]:
    """BEFORE's param types with every 2-D weight in `default` (a format or f32), some overridden."""
    want = {nid: f"{default}[{'16' if nid in ('table', 'head') else '64'}, 64]" for nid in WEIGHTS if nid != "nw"}
    want["nw"] = "f32[64]"
    for nid, fmt in by_id.items():
        want[nid] = f"{fmt}[{want[nid].split('[')[1]}"
    return want


# ---- what it retypes ----

def test_golden_q4() -> None:
    assert_golden(Quantize(scheme="q4"), BEFORE, AFTER_Q4)


def test_golden_gguf_keeps_each_stored_block_type() -> None:
    assert_golden(Quantize(scheme="gguf"), BEFORE, AFTER_GGUF)
    stats = Quantize(scheme="gguf").run(hir(BEFORE)).stats
    assert stats == {"format.q8_0": 3, "format.q4_0": 2, "format.q4_1": 1, "kept-float": 1}


@pytest.mark.parametrize(("scheme", "group", "fmt"), [
    ("q8", 32, "q8_0"), ("q4a", 32, "q4_1"), ("q8", 64, "q8_0g64"), ("q4", 64, "q4_0g64"), ("q4a", 64, "q4_1g64"),
])
def test_scheme_and_group_name_the_format(scheme: str, group: int, fmt: str) -> None:
    result = Quantize(scheme=scheme, group=group).run(hir(BEFORE))
    assert _types(verify(result.hir)) == _expect(fmt)
    assert result.changed and result.stats == {f"format.{fmt}": 7}


def test_per_layer_schemes_follow_the_params_layer() -> None:
    """layers= gives layer i's weights scheme i (`layer` meta on the param); the embedding and
    head (no layer) keep `scheme`."""
    out = verify(Quantize(scheme="q8", layers=("q4", "none")).run(hir(BEFORE)).hir)
    assert _types(out) == _expect("q8_0", wq="q4_0", wk="q4_0", wv="q4_0", wg="f32", wu="f32")
    out = verify(Quantize(scheme="q4", layers="gguf|q4a").run(hir(BEFORE)).hir)  # text form: "|"-separated
    assert _types(out) == _expect("q4_0", wq="q4_0", wk="q4_0", wv="q8_0", wg="q4_1", wu="q4_1")


def test_embed_and_head_overrides() -> None:
    out = verify(Quantize(scheme="q4", embed="q8", head="none").run(hir(BEFORE)).hir)
    assert _types(out) == _expect("q4_0", table="q8_0", head="f32")
    result = Quantize(scheme="none", head="q8").run(hir(BEFORE))
    assert _types(result.hir) == _expect("f32", head="q8_0")
    assert result.stats == {"format.q8_0": 1, "kept-float": 6}
    # an override beats the layer's scheme too: neither the table nor the head has a layer
    out = Quantize(scheme="q8", layers=("none", "none"), embed="q4a", head="gguf").run(hir(BEFORE)).hir
    assert _types(out) == _expect("f32", table="q4_1", head="q8_0")


TIED = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %x = input() {"name": "x"} : f32[1, SEQ, 64]
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : f32[16, 64] meta {"stored": "Q6_K"}
  %logits = linear(%x, %table) : f32[1, SEQ, 16] meta {"role": "head"}
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  return logits=%logits, e=%e
}
"""


@pytest.mark.parametrize("head_first", [True, False])
def test_tied_head_takes_the_embeddings_choice(head_first: bool) -> None:
    """A tied head reads the embedding table: one tensor, one format, the embedding's (whichever
    reader comes first in the graph)."""
    text = TIED if head_first else TIED.replace(
        '  %e = embed(%table, %ids) : f32[1, SEQ, 64]\n', '').replace(
        '  %logits =', '  %e = embed(%table, %ids) : f32[1, SEQ, 64]\n  %logits =')
    before = hir(text)
    order = [n.id for n in before.nodes()]
    assert (order.index("logits") < order.index("e")) == head_first
    for p, want in [(Quantize(scheme="q8", embed="q4", head="q4a"), "q4_0[16, 64]"),
                    (Quantize(scheme="q8", head="q4"), "q8_0[16, 64]"),
                    (Quantize(scheme="none", head="q8"), "f32[16, 64]"),
                    (Quantize(scheme="q4", embed="none", head="q8"), "f32[16, 64]")]:
        result = p.run(before)
        assert str(verify(result.hir).node("table").type) == want, p
        assert sum(result.stats.values()) == 1  # one tensor, counted once


# ---- gguf: stored types ----

def _one_linear(stored: str | None, *, k: int = 64, scale: float = 1.0, layer: int | None = 0) -> HIR:
    """y = linear(x, w) with w [8, k] stored as `stored` (None: no stored meta)."""
    h = HIR("one")
    x = h.input("x", TensorType(DType.F32, (2, k)))
    meta: dict[str, object] = {} if stored is None else {"stored": stored}
    if layer is not None:
        meta["layer"] = layer
    w = h.param("layers.0.q_proj.weight", TensorType(DType.F32, (8, k)), scale=scale, meta=meta)
    h.set_output("y", h.add(Op.LINEAR, [x, w], meta={"role": "q"} if layer is None else {"layer": layer, "role": "q"}))
    return verify(h)


def _weight_type(h: HIR) -> str:
    return str(h.node(h.node(h.outputs["y"]).inputs[1]).type)


@pytest.mark.parametrize(("stored", "want"), [
    ("Q8_0", "q8_0[8, 256]"), ("q4_1", "q4_1[8, 256]"), ("Q5_0", "q5_0[8, 256]"), ("Q5_1", "q5_1[8, 256]"),
    ("Q4_K", "q4_k[8, 256]"), ("Q5_K", "q5_k[8, 256]"), ("Q6_K", "q6_k[8, 256]"),
    ("F32", "f32[8, 256]"), ("F16", "f32[8, 256]"), ("BF16", "f32[8, 256]"), ("bfloat16", "f32[8, 256]"),
    (None, "f32[8, 256]"),
])
def test_gguf_keeps_the_stored_type(stored: str | None, want: str) -> None:
    out = Quantize(scheme="gguf").run(_one_linear(stored, k=256)).hir
    assert _weight_type(verify(out)) == want


def test_gguf_keeps_a_derived_weight_float() -> None:
    """`stored * scale` has no stored blocks; q8 quantizes its float value instead."""
    h = _one_linear("Q8_0", scale=2.0)
    assert _weight_type(Quantize(scheme="gguf").run(h).hir) == "f32[8, 64]"
    assert _weight_type(Quantize(scheme="q8").run(h).hir) == "q8_0[8, 64]"


@pytest.mark.parametrize("stored", ["IQ2_XXS", "Q2_K", "Q8_1", "TQ1_0"])
def test_gguf_refuses_a_block_type_rlx_does_not_compute_with(stored: str) -> None:
    with pytest.raises(PassError, match=f"tensor layers.0.q_proj.weight is stored as {stored},") as e:
        Quantize(scheme="gguf").run(_one_linear(stored, k=256))
    assert e.value.hint is not None and "--quantize q8 or q4" in e.value.hint
    assert "Q4_K" in e.value.message  # it says which block types it does read
    # the way out the hint names: that layer (or the whole model) quantized from floats
    assert _weight_type(Quantize(scheme="gguf", layers=("q8",)).run(_one_linear(stored, k=256)).hir) == "q8_0[8, 256]"


# ---- errors ----

@pytest.mark.parametrize(("scheme", "group", "k"), [("q4", 32, 48), ("q8", 64, 96), ("q4a", 256, 128)])
def test_group_must_divide_the_rows(scheme: str, group: int, k: int) -> None:
    with pytest.raises(PassError, match=f"tensor layers.0.q_proj.weight has rows of {k} values, not a multiple "
                                        f"of {scheme}'s group of {group}") as e:
        Quantize(scheme=scheme, group=group).run(_one_linear(None, k=k))
    # the fix names the group sizes that do divide the rows, or says there is none (48: 32 does not)
    fitting = {96: "[quantize] group = 32", 128: "[quantize] group = 32 or 64 or 128"}
    assert e.value.hint is not None and (f"a group size dividing {k} ({fitting[k]})" if k in fitting else
                                         f"no group size (32, 64, 128, 256) divides {k}") in e.value.hint
    assert 'keep it float: [quantize] keep = ["layers.*.q_proj.weight"]' in e.value.hint
    # the keep glob the fix names, keeping that layer float, or a scheme without groups, is fine
    assert _weight_type(Quantize(scheme=scheme, group=group, keep=("layers.*.q_proj.weight",))
                        .run(_one_linear(None, k=k)).hir) == f"f32[8, {k}]"
    assert _weight_type(Quantize(scheme=scheme, group=group, layers=("none",)).run(_one_linear(None, k=k)).hir) \
        == f"f32[8, {k}]"
    assert _weight_type(Quantize(scheme="gguf", group=group).run(_one_linear("F16", k=k)).hir) == f"f32[8, {k}]"


@pytest.mark.parametrize(("options", "message", "hint"), [
    ({"scheme": "q3"}, "scheme='q3' is not a scheme", "use one of none, gguf, q8, q4, q4a"),
    ({"scheme": "Q8"}, "scheme='Q8' is not a scheme", "use one of none, gguf, q8, q4, q4a"),
    ({"group": 48}, "group=48 is not a supported group size", "use one of 32, 64, 128, 256"),
    ({"group": 16}, "group=16 is not a supported group size", "use one of 32, 64, 128, 256"),
    ({"layers": ("q8", "q2")}, "layers='q2' is not a scheme", "use one of none, gguf"),
    ({"layers": "q8|int4"}, "layers='int4' is not a scheme", "use one of none, gguf"),
    ({"embed": "fp8"}, "embed='fp8' is not a scheme", "use one of none, gguf"),
    ({"head": "q5"}, "head='q5' is not a scheme", "use one of none, gguf"),
])
def test_bad_options_are_errors_with_a_hint(options: dict[str, object], message: str, hint: str) -> None:
    with pytest.raises(PassError, match=message) as e:
        Quantize(**options)  # type: ignore[arg-type]
    assert e.value.hint is not None and hint in e.value.hint


@pytest.mark.parametrize(("layers", "position", "given"), [
    ("q8||q4", 1, "'q8||q4'"), ("|q8|q4", 0, "'|q8|q4'"), ("q8|q4|", 2, "'q8|q4|'"), ("q8| |q4", 1, "'q8| |q4'"),
    (("q8", "", "q4"), 1, "q8||q4"),
])
def test_an_empty_layer_scheme_is_an_error_naming_its_position(layers: str | tuple[str, ...], position: int,
                                                               given: str) -> None:
    """Dropping it would shift every later layer's scheme onto the layer before: an error instead."""
    with pytest.raises(PassError, match=f"layers={re.escape(given)} has an empty entry at position {position} of 3 "
                                        rf"\(the scheme of layer {position}\)") as e:
        Quantize(scheme="q8", layers=layers)
    assert e.value.hint is not None and "one scheme per layer" in e.value.hint
    with pytest.raises(PassError, match="empty entry at position 1"):
        parse_pipeline("quantize{layers=q8||q4}")
    assert Quantize(layers="").layers == () and Quantize(layers=" q8 | q4 ").layers == ("q8", "q4")


def test_too_few_layer_schemes_is_an_error() -> None:
    with pytest.raises(PassError, match="the graph has a layer 1, but layers= gives 1 schemes") as e:
        Quantize(scheme="q8", layers=("q4",)).run(hir(BEFORE))
    assert e.value.hint is not None and "one scheme per layer" in e.value.hint


def test_pipeline_text_round_trips() -> None:
    text = "quantize{scheme=q8,group=64,layers=q4|none,embed=none,head=q4a}"
    passes = parse_pipeline(text)
    assert passes == [Quantize(scheme="q8", group=64, layers=("q4", "none"), embed="none", head="q4a")]
    assert format_pipeline(passes) == text
    assert str(Quantize()) == "quantize"  # defaults: q4, group 32
    with pytest.raises(PassError, match="is not a int"):
        parse_pipeline("quantize{group=wide}")


# ---- only weights read as blocks ----

def test_only_2d_float_weights_that_are_read_as_blocks() -> None:
    """Retyped: a linear's weight, a linear_epilogue's weight. Kept: a 1-D param, an activation
    weight (an input), a weight some other op (a matmul) or a graph output also reads: verify's
    `quantized` rule allows blocks only where they are read as blocks."""
    h = HIR("mixed")
    x = h.input("x", TensorType(DType.F32, (2, 32)))
    f32 = TensorType(DType.F32, (32, 32))
    lin = h.param("lin", f32)
    epi = h.param("epi", f32)
    shared = h.param("shared", f32)
    exported = h.param("exported", f32)
    bias = h.param("bias", TensorType(DType.F32, (32,)))
    act = h.input("act", f32)
    y = h.add(Op.LINEAR, [x, lin])
    y = h.add(Op.LINEAR_EPILOGUE, [y, epi, bias], {"steps": ("add",)})
    y = h.add(Op.LINEAR, [y, shared])
    y = h.add(Op.MATMUL, [y, shared])
    y = h.add(Op.LINEAR, [y, act])
    y = h.add(Op.LINEAR, [y, exported])
    h.set_output("y", y)
    h.set_output("w", exported)
    result = Quantize(scheme="q8").run(verify(h))
    out = verify(result.hir)
    assert {n.attr("name"): str(n.type) for n in out.nodes_of(Op.PARAM)} == {
        "lin": "q8_0[32, 32]", "epi": "q8_0[32, 32]", "shared": "f32[32, 32]", "exported": "f32[32, 32]",
        "bias": "f32[32]"}
    assert result.stats == {"format.q8_0": 2}


def test_none_changes_nothing_and_quantizing_twice_is_the_identity() -> None:
    before = hir(BEFORE)
    result = Quantize(scheme="none").run(before)
    assert not result.changed and print_hir(result.hir) == print_hir(before)
    assert result.stats == {"kept-float": 7}
    once = Quantize(scheme="q4").run(before).hir
    twice = Quantize(scheme="q8").run(once)  # already quantized: not read again
    assert not twice.changed and print_hir(twice.hir) == print_hir(once)


# ---- numbers ----

def _round_trip(w: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """dequantize(quantize(w)): gguf's at group 32 (the reference); rlx's own at other groups,
    whose error bounds and layout tests/hir/test_quant.py checks."""
    if fmt.name in TWIN:
        return gguf.quants.dequantize(gguf.quants.quantize(w, TWIN[fmt.name]), TWIN[fmt.name])
    return fmt.dequantize(fmt.quantize(w))


def _dequantized_weights(quantized: HIR, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float weights the quantized graph computes with."""
    out = dict(weights)
    for p in quantized.nodes_of(Op.PARAM):
        if p.type.is_quantized:
            out[p.attr("name")] = _round_trip(weights[p.attr("name")], quant_format(p.type.quant))  # type: ignore[arg-type]
    return out


def _run(h: HIR, weights: object, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return Interpreter(h, weights).run(feeds)  # type: ignore[arg-type]


@pytest.mark.parametrize(("scheme", "group"), [("q8", 32), ("q4", 32), ("q4a", 32), ("q8", 64), ("q4", 64)])
def test_quantized_graph_computes_with_the_dequantized_weights(scheme: str, group: int) -> None:
    before = hir(BEFORE)
    after = Quantize(scheme=scheme, group=group).run(before).hir
    rng = np.random.default_rng(0)
    feeds, weights = random_feeds(before, ENV, rng), random_weights(before, rng)
    ours = _run(after, weights, feeds)["logits"]
    ref = _run(before, _dequantized_weights(after, weights), feeds)["logits"]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)  # module docstring: summation order only
    assert not np.array_equal(ref, _run(before, weights, feeds)["logits"])  # the weights did change


# Relative Frobenius error of the logits against the float graph, per scheme. For one linear
# y = W x on inputs x independent of the weight error E, ||E x|| / ||W x|| ~ ||E||_F / ||W||_F,
# the weights' relative rms error: for gaussian weights, blocks of 32 (largest value ~2.1 sigma)
# and a uniform rounding error (step / sqrt 12), that is 2.1 / 127 / 3.5 ~ 0.5% for q8_0 and
# 2.1 / 8 / 3.5 ~ 7.5% for q4_0 (q4_1's step is (max - min) / 15, ~4.2 sigma / 15: ~8%). BEFORE
# chains such products: q + k + v, then gate * up (a product: both factors' errors add), then
# the head, about 3-4x one linear's error. Measured: seed 0 (the test's) 1.2% (q8), 27% (q4),
# 21% (q4a); the worst of seeds 0..19 1.9% / 36% / 32%. The bounds are 3% / 45% / 45%; a format
# decoded wrong (a lost scale, swapped nibbles) gives uncorrelated logits, ~145% measured.
CLOSE = {"q8": 0.03, "q4": 0.45, "q4a": 0.45}


@pytest.mark.parametrize("scheme", sorted(CLOSE))
def test_quantized_logits_stay_near_the_float_ones(scheme: str) -> None:
    before = hir(BEFORE)
    after = Quantize(scheme=scheme).run(before).hir
    rng = np.random.default_rng(0)
    feeds, weights = random_feeds(before, ENV, rng), random_weights(before, rng)
    ours, ref = _run(after, weights, feeds)["logits"], _run(before, weights, feeds)["logits"]
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert 0 < rel <= CLOSE[scheme], f"{scheme}: relative error {rel:.3g}"


def test_interpreter_quantizes_float_weights_as_gguf_does() -> None:
    """Without stored blocks the interpreter quantizes the float weight, a derived one from its
    derived value (`stored * scale + shift`)."""
    h = HIR("derived")
    x = h.input("x", TensorType(DType.F32, (2, 64)))
    plain = h.param("w", TensorType(DType.F32, (8, 64)))
    derived = h.param("w", TensorType(DType.F32, (8, 64)), scale=3.0, shift=0.5)
    h.set_output("y", h.add(Op.ADD, [h.add(Op.LINEAR, [x, plain]), h.add(Op.LINEAR, [x, derived])]))
    out = Quantize(scheme="q4a").run(verify(h)).hir
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    interp = Interpreter(out, {"w": w})
    for nid, value in ((plain, w), (derived, w * np.float32(3.0) + np.float32(0.5))):
        q = interp.param(out.node(nid))
        assert isinstance(q, QuantizedArray) and q.format.name == "q4_1"
        np.testing.assert_array_equal(q.blocks, gguf.quants.quantize(value, GT.Q4_1))


class _GGUFLike(dict):
    """A weight source holding some tensors only as stored blocks, as a GGUF does: asking for their
    float values is a KeyError, so a test passes only if the interpreter took the blocks."""

    def __init__(self, floats: Mapping[str, np.ndarray], blocks: Mapping[str, tuple[str, np.ndarray]]) -> None:
        super().__init__(floats)
        self.blocks = dict(blocks)

    def packed(self, name: str, fmt: QuantFormat) -> np.ndarray | None:
        stored = self.blocks.get(name)
        return stored[1] if stored is not None and stored[0] == fmt.name else None


def _stored_blocks(name: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks in GGUF type `name` with finite f16 scales (llama.cpp's struct offsets)."""
    fmt = quant_format(name)
    blocks = rng.integers(0, 256, (rows * k // fmt.block, fmt.block_bytes), dtype=np.uint8)
    for at in {"q4_k": (0, 2), "q6_k": (208,), "q5_0": (0,), "q8_0": (0,)}[name]:
        blocks[:, at:at + 2] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, fmt.row_bytes(k))


def test_interpreter_reads_a_ggufs_stored_blocks() -> None:
    """Under gguf, a weight the source stores in its format is read as those blocks, never from
    floats; the result is the float graph on gguf's dequantization of the same blocks."""
    h = HIR("stored")
    x = h.input("x", TensorType(DType.F32, (3, 256)))
    ys = []
    for i, stored in enumerate(("Q4_K", "Q6_K", "Q5_0", "Q8_0")):
        w = h.param(f"w{i}", TensorType(DType.F32, (8, 256)), meta={"stored": stored})
        ys.append(h.add(Op.LINEAR, [x, w]))
    table = h.param("table", TensorType(DType.F32, (16, 256)), meta={"stored": "Q4_K"})
    ids = h.input("ids", TensorType(DType.I64, (1, 4)))
    h.set_output("y", h.add(Op.ADD, [h.add(Op.ADD, [ys[0], ys[1]]), h.add(Op.ADD, [ys[2], ys[3]])]))
    h.set_output("e", h.add(Op.EMBED, [table, ids]))
    before = verify(h)
    after = Quantize(scheme="gguf").run(before).hir
    assert {n.attr("name"): n.type.quant for n in after.nodes_of(Op.PARAM)} == {
        "w0": "q4_k", "w1": "q6_k", "w2": "q5_0", "w3": "q8_0", "table": "q4_k"}
    rng = np.random.default_rng(6)
    blocks = {f"w{i}": (fmt, _stored_blocks(fmt, 8, 256, rng)) for i, fmt in enumerate(("q4_k", "q6_k", "q5_0", "q8_0"))}
    blocks["table"] = ("q4_k", _stored_blocks("q4_k", 16, 256, rng))
    feeds = {"x": rng.standard_normal((3, 256)).astype(np.float32), "ids": np.array([[3, 0, 15, 3]])}
    ours = _run(after, _GGUFLike({}, blocks), feeds)
    floats = {name: gguf.quants.dequantize(b, GT[fmt.upper()]) for name, (fmt, b) in blocks.items()}
    ref = _run(before, floats, feeds)
    assert np.isfinite(ref["y"]).all() and np.abs(ref["y"]).max() > 0
    np.testing.assert_allclose(ours["y"], ref["y"], rtol=1e-5, atol=1e-5)  # module docstring
    np.testing.assert_array_equal(ours["e"], ref["e"])  # a lookup: the rows themselves


def test_interpreter_quantizes_when_the_source_has_no_blocks_in_that_format() -> None:
    """q8 of a tensor the source stores as Q4_0: the stored blocks are another format, so the
    interpreter quantizes the float values; and a derived weight never takes stored blocks."""
    h = _one_linear("Q4_0")
    w = np.random.default_rng(7).standard_normal((8, 64)).astype(np.float32)
    source = _GGUFLike({"layers.0.q_proj.weight": w},
                       {"layers.0.q_proj.weight": ("q4_0", gguf.quants.quantize(w, GT.Q4_0))})
    out = Quantize(scheme="q8").run(h).hir
    q = Interpreter(out, source).param(out.node(out.node(out.outputs["y"]).inputs[1]))
    assert isinstance(q, QuantizedArray)
    np.testing.assert_array_equal(q.blocks, gguf.quants.quantize(w, GT.Q8_0))
    derived = Quantize(scheme="q4").run(_one_linear("Q4_0", scale=2.0)).hir
    q = Interpreter(derived, source).param(derived.node(derived.node(derived.outputs["y"]).inputs[1]))
    assert isinstance(q, QuantizedArray)
    np.testing.assert_array_equal(q.blocks, gguf.quants.quantize(w * np.float32(2.0), GT.Q4_0))


# ---- composition: fusion sees the formats, folding leaves blocks alone ----

def _concats(h: HIR) -> list[tuple[tuple[str, ...], str]]:
    return [(n.inputs, str(n.type)) for n in h.nodes_of(Op.CONCAT)]


def _assert_same_numbers(a: HIR, b: HIR) -> None:
    rng = np.random.default_rng(1)
    feeds, weights = random_feeds(a, ENV, rng), random_weights(a, rng)
    np.testing.assert_allclose(_run(b, weights, feeds)["logits"], _run(a, weights, feeds)["logits"],
                               rtol=1e-5, atol=1e-5)  # module docstring


def test_fusion_fuses_only_weights_of_one_format() -> None:
    """gguf: q and k are q4_0, v q8_0: q|k fuse, v stays its own matmul; gate (q4_1) and up
    (float) do not fuse at all."""
    quantized = Quantize(scheme="gguf").run(hir(BEFORE)).hir
    qkv = FuseQKV().run(quantized)
    assert qkv.stats == {"hits.qkv": 1, "misses.qkv": 0}
    assert _concats(verify(qkv.hir)) == [(("wq", "wk"), "q4_0[128, 64]")]
    assert qkv.hir.node("v").op is Op.LINEAR and qkv.hir.node("v").inputs == ("e", "wv")
    gate_up = FuseGateUp().run(qkv.hir)
    assert not gate_up.changed and gate_up.stats == {"hits.gate-up": 0, "misses.gate-up": 0}
    _assert_same_numbers(quantized, qkv.hir)


def test_fusion_of_one_format_concatenates_blocks() -> None:
    quantized = Quantize(scheme="q4a", group=64).run(hir(BEFORE)).hir
    fused = FuseGateUp().run(FuseQKV().run(quantized).hir).hir
    assert _concats(verify(fused)) == [(("wq", "wk", "wv"), "q4_1g64[192, 64]"), (("wg", "wu"), "q4_1g64[128, 64]")]
    _assert_same_numbers(quantized, fused)


def test_per_layer_formats_fuse_within_each_layer() -> None:
    quantized = Quantize(scheme="q4", layers=("q8", "q4")).run(hir(BEFORE)).hir
    fused = FuseGateUp().run(FuseQKV().run(quantized).hir).hir
    assert _concats(verify(fused)) == [(("wq", "wk", "wv"), "q8_0[192, 64]"), (("wg", "wu"), "q4_0[128, 64]")]


SCALED_EMBED = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : TABLE[16, 64]
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  %s = scale(%e) {"value": 8.0} : f32[1, SEQ, 64]
  return x=%s
}
"""


def test_fold_constants_leaves_a_quantized_tables_scale_alone() -> None:
    """Scaling a quantized table would quantize it again; a float one takes the scale."""
    assert_golden(FoldConstants(), SCALED_EMBED.replace("TABLE", "q8_0"), SCALED_EMBED.replace("TABLE", "q8_0"))
    folded = FoldConstants().run(hir(SCALED_EMBED.replace("TABLE", "f32"))).hir
    assert [(p.attr("scale"), str(p.type)) for p in folded.nodes_of(Op.PARAM)] == [(8.0, "f32[16, 64]")]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["none", "gguf", "q8", "q4", "q4a"]), min_size=2, max_size=2),
       st.sampled_from(["", "none", "q8", "q4a"]), st.sampled_from(["", "none", "gguf", "q4"]),
       st.sampled_from([32, 64]))
def test_property_any_scheme_mix_is_valid_and_computes_with_its_blocks(
        layers: list[str], embed: str, head: str, group: int) -> None:
    """Whatever the mix, the graph verifies, each weight's format is the one its reader's scheme
    names, and fused or not it computes the float graph on the dequantized weights."""
    p = Quantize(scheme="q8", group=group, layers=tuple(layers), embed=embed, head=head)
    before = hir(BEFORE)
    after = verify(p.run(before).hir)
    stored = {"table": "q8_0", "wq": "q4_0", "wk": "q4_0", "wv": "q8_0", "wg": "q4_1", "wu": "f32", "head": "q8_0"}
    family = {"none": "f32", "q8": "q8_0", "q4": "q4_0", "q4a": "q4_1"}
    suffix = "" if group == 32 else f"g{group}"
    for nid, scheme in [("table", embed or "q8"), ("head", head or "q8"), *[(w, layers[0]) for w in ("wq", "wk", "wv")],
                        *[(w, layers[1]) for w in ("wg", "wu")]]:
        want = stored[nid] if scheme == "gguf" else family[scheme] + ("" if scheme == "none" else suffix)
        assert str(after.node(nid).type).split("[")[0] == want, (nid, scheme)
    fused = verify(FuseGateUp().run(FuseQKV().run(after).hir).hir)
    rng = np.random.default_rng(2)
    feeds, weights = random_feeds(before, ENV, rng), random_weights(before, rng)
    ref = _run(before, _dequantized_weights(after, weights), feeds)["logits"]
    for h in (after, fused):
        np.testing.assert_allclose(_run(h, weights, feeds)["logits"], ref, rtol=1e-5, atol=1e-5)  # module docstring
