"""precision{compute=...}: the rewrite (golden text, classes, casts, KV cache, per-layer dtypes), the
interpreter's dtype semantics, and f16 / bf16 tiny Gemmas against their f32 graphs.

Tolerance (tiny Gemma logits, interpreter f16 / bf16 vs the same graph in f32): with u the unit
roundoff (f16 2^-11, bf16 2^-8), we assert max|diff| <= C * u * (L + 2) * max|logit|, C = 4, for
a model of L layers: each layer rounds the residual stream a bounded number of times (the
inputs of its norms, its matmuls' outputs, its adds), each rounding is relative u, and
perturbations add at most linearly over the L layers plus the embedding and the LM head.
Measured over 11 tiny families, fused and unfused, mixed auto and off (prefill of a 10-token
prompt): worst 11.5u (f16) and 15u (bf16) at L = 4, where the bound is 24u: 2x and 1.6x
headroom. MoE is left out for bf16: routing is discontinuous (a rounding of the router input
can pick another expert; 26u seen once), which no per-op rounding bound covers. At L = 4 the
bound is 1.2% (f16) / 9.4% (bf16) of max|logit|: loose enough for rounding, far below what a
wrong value does (a lost scale, a mask filled with -inf, a weight cast to the wrong dtype: NaNs
or O(max) changes); where each op computes is checked on the node dtypes, not the numbers.
Top-1 must agree wherever the f32 top-2 margin exceeds twice the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.compiler.engines import reference_engine
from rlx.compiler.graphs import reference_graphs
from rlx.compiler.graphs import run_pipeline as optimize
from rlx.compiler.profile import Profile
from rlx.compiler.profile_toml import parse_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.pass_infra import PassError, format_pipeline, parse_pipeline
from rlx.hir.tensor_type import TensorType
from rlx.hir.verify import verify
from rlx.passes.precision import COMPUTE_OPS, F32_OPS, MIXED, Precision, static_nodes
from tests.hir.graphs import random_graphs, tiny_block

from .harness import assert_golden, hir

Ckpt = Callable[[str], Path]
PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]
UNIT_ROUNDOFF = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8}
C = 4

BEFORE = """
hir m {"kv": [{"layer": 0, "kind": "k", "past": "past_k.0", "present": "present_k.0"}]} {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %past = input() {"name": "past_k.0"} : f32[1, 1, PAST_SEQ, 4] meta {"layer": 0}
  %table = param() {"name": "embed", "scale": 1.0, "shift": 0.0} : f32[16, 4]
  %nw = param() {"name": "norm", "scale": 1.0, "shift": 0.0} : f32[4]
  %wk = param() {"name": "wk", "scale": 1.0, "shift": 0.0} : f32[4, 4]
  %e = embed(%table, %ids) : f32[1, SEQ, 4]
  %l0.norm = rms_norm(%e, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 4] meta {"layer": 0}
  %l0.k = linear(%l0.norm, %wk) : f32[1, SEQ, 4] meta {"layer": 0}
  %l0.k.heads = reshape(%l0.k) {"shape": [1, "SEQ", 1, 4]} : f32[1, SEQ, 1, 4] meta {"layer": 0}
  %l0.k.t = transpose(%l0.k.heads) {"perm": [0, 2, 1, 3]} : f32[1, 1, SEQ, 4] meta {"layer": 0}
  %l0.k.cache = concat(%past, %l0.k.t) {"axis": 2} : f32[1, 1, PAST_SEQ+SEQ, 4] meta {"layer": 0}
  %l0.res = add(%e, %l0.k) : f32[1, SEQ, 4] meta {"layer": 0}
  %final_norm = rms_norm(%l0.res, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 4]
  %lm_head = linear(%final_norm, %table) : f32[1, SEQ, 16]
  %final_softcap = softcap(%lm_head) {"cap": 30.0} : f32[1, SEQ, 16]
  return logits=%final_softcap, present_k.0=%l0.k.cache
}
"""

# mixed=auto: one f16 copy of the tied table (embedding and LM head), the norm weight stays f32,
# casts around the norms and the softcap, the KV cache (past input and present output) in f16,
# the logits f32
AFTER_AUTO = """
hir m {"kv": [{"layer": 0, "kind": "k", "past": "past_k.0", "present": "present_k.0"}]} {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %past = input() {"name": "past_k.0"} : f16[1, 1, PAST_SEQ, 4] meta {"layer": 0}
  %table = param() {"name": "embed", "scale": 1.0, "shift": 0.0} : f32[16, 4]
  %nw = param() {"name": "norm", "scale": 1.0, "shift": 0.0} : f32[4]
  %wk = param() {"name": "wk", "scale": 1.0, "shift": 0.0} : f32[4, 4]
  %table.f16 = cast(%table) {"dtype": "f16"} : f16[16, 4]
  %e = embed(%table.f16, %ids) : f16[1, SEQ, 4]
  %e.f32 = cast(%e) {"dtype": "f32"} : f32[1, SEQ, 4]
  %l0.norm = rms_norm(%e.f32, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 4] meta {"layer": 0}
  %l0.norm.f16 = cast(%l0.norm) {"dtype": "f16"} : f16[1, SEQ, 4]
  %wk.f16 = cast(%wk) {"dtype": "f16"} : f16[4, 4]
  %l0.k = linear(%l0.norm.f16, %wk.f16) : f16[1, SEQ, 4] meta {"layer": 0}
  %l0.k.heads = reshape(%l0.k) {"shape": [1, "SEQ", 1, 4]} : f16[1, SEQ, 1, 4] meta {"layer": 0}
  %l0.k.t = transpose(%l0.k.heads) {"perm": [0, 2, 1, 3]} : f16[1, 1, SEQ, 4] meta {"layer": 0}
  %l0.k.cache = concat(%past, %l0.k.t) {"axis": 2} : f16[1, 1, PAST_SEQ+SEQ, 4] meta {"layer": 0}
  %l0.res = add(%e, %l0.k) : f16[1, SEQ, 4] meta {"layer": 0}
  %l0.res.f32 = cast(%l0.res) {"dtype": "f32"} : f32[1, SEQ, 4]
  %final_norm = rms_norm(%l0.res.f32, %nw) {"eps": 1e-06, "offset": 0.0} : f32[1, SEQ, 4]
  %final_norm.f16 = cast(%final_norm) {"dtype": "f16"} : f16[1, SEQ, 4]
  %lm_head = linear(%final_norm.f16, %table.f16) : f16[1, SEQ, 16]
  %lm_head.f32 = cast(%lm_head) {"dtype": "f32"} : f32[1, SEQ, 16]
  %final_softcap = softcap(%lm_head.f32) {"cap": 30.0} : f32[1, SEQ, 16]
  return logits=%final_softcap, present_k.0=%l0.k.cache
}
"""

# mixed=off: the norms (and their shared weight, cast once) and the softcap in bf16 too; only
# the logits output is cast back to its declared f32
AFTER_OFF = """
hir m {"kv": [{"layer": 0, "kind": "k", "past": "past_k.0", "present": "present_k.0"}]} {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %past = input() {"name": "past_k.0"} : bf16[1, 1, PAST_SEQ, 4] meta {"layer": 0}
  %table = param() {"name": "embed", "scale": 1.0, "shift": 0.0} : f32[16, 4]
  %nw = param() {"name": "norm", "scale": 1.0, "shift": 0.0} : f32[4]
  %wk = param() {"name": "wk", "scale": 1.0, "shift": 0.0} : f32[4, 4]
  %table.bf16 = cast(%table) {"dtype": "bf16"} : bf16[16, 4]
  %e = embed(%table.bf16, %ids) : bf16[1, SEQ, 4]
  %nw.bf16 = cast(%nw) {"dtype": "bf16"} : bf16[4]
  %l0.norm = rms_norm(%e, %nw.bf16) {"eps": 1e-06, "offset": 0.0} : bf16[1, SEQ, 4] meta {"layer": 0}
  %wk.bf16 = cast(%wk) {"dtype": "bf16"} : bf16[4, 4]
  %l0.k = linear(%l0.norm, %wk.bf16) : bf16[1, SEQ, 4] meta {"layer": 0}
  %l0.k.heads = reshape(%l0.k) {"shape": [1, "SEQ", 1, 4]} : bf16[1, SEQ, 1, 4] meta {"layer": 0}
  %l0.k.t = transpose(%l0.k.heads) {"perm": [0, 2, 1, 3]} : bf16[1, 1, SEQ, 4] meta {"layer": 0}
  %l0.k.cache = concat(%past, %l0.k.t) {"axis": 2} : bf16[1, 1, PAST_SEQ+SEQ, 4] meta {"layer": 0}
  %l0.res = add(%e, %l0.k) : bf16[1, SEQ, 4] meta {"layer": 0}
  %final_norm = rms_norm(%l0.res, %nw.bf16) {"eps": 1e-06, "offset": 0.0} : bf16[1, SEQ, 4]
  %lm_head = linear(%final_norm, %table.bf16) : bf16[1, SEQ, 16]
  %final_softcap = softcap(%lm_head) {"cap": 30.0} : bf16[1, SEQ, 16]
  %final_softcap.f32 = cast(%final_softcap) {"dtype": "f32"} : f32[1, SEQ, 16]
  return logits=%final_softcap.f32, present_k.0=%l0.k.cache
}
"""


def test_golden_mixed_auto() -> None:
    assert_golden(Precision(compute="f16"), BEFORE, AFTER_AUTO)


def test_golden_mixed_off() -> None:
    assert_golden(Precision(compute="bf16", mixed="off"), BEFORE, AFTER_OFF)


def test_per_layer_dtype_keeps_that_layer_f32() -> None:
    """layers=f32: layer 0 (its nodes, its KV cache) stays f32; embedding and LM head are f16."""
    out = Precision(compute="f16", layers=("f32",)).run(hir(BEFORE)).hir
    verify(out)
    dtypes = {n.id: n.type.dtype.value for n in out.nodes()}
    assert {k: dtypes[k] for k in ("past", "l0.norm", "l0.k", "l0.k.cache", "l0.res")} == dict.fromkeys(
        ("past", "l0.norm", "l0.k", "l0.k.cache", "l0.res"), "f32")
    assert (dtypes["e"], dtypes["lm_head"], dtypes["final_softcap"]) == ("f16", "f16", "f32")
    assert out.node("l0.k").inputs == ("l0.norm", "wk")  # an f32 layer reads the f32 weight as stored


def test_stats_and_f32_is_the_identity() -> None:
    assert Precision(compute="f16").run(hir(BEFORE)).stats == {"casts": 5, "weight-casts": 2, "retyped": 8}
    h = tiny_block()
    result = Precision().run(h)
    assert result.hir == h and not result.changed


def test_pipeline_text_round_trips_and_bad_options_are_errors() -> None:
    passes = parse_pipeline("dce,precision{compute=bf16,mixed=off,layers=f16|f32|bf16}")
    assert format_pipeline(passes) == "dce,precision{compute=bf16,mixed=off,layers=f16|f32|bf16}"
    assert passes[1] == Precision(compute="bf16", mixed="off", layers=("f16", "f32", "bf16"))
    assert parse_pipeline(format_pipeline(passes)) == passes
    for text in ("precision{compute=f64}", "precision{compute=i32}", "precision{mixed=on}",
                 "precision{layers=f16|f8}"):
        with pytest.raises(PassError):
            parse_pipeline(text)
    with pytest.raises(PassError, match="has a layer 1"):  # one dtype per layer, or none
        Precision(compute="f16", layers=("f16",)).run(hir(BEFORE.replace("l0.", "l1.").replace('"layer": 0', '"layer": 1')))


# ---- the interpreter computes in the node dtypes ----

def _run(h: HIR, **feeds: np.ndarray) -> np.ndarray:
    return Interpreter(h).run(feeds)["y"]


def _graph(op: Op, dtype: DType, shape: tuple[int, ...], *extra: np.ndarray) -> HIR:
    """y = op(x, consts...) with x an f32 input cast to `dtype` first."""
    h = HIR()
    x = h.add(Op.CAST, [h.input("x", TensorType(DType.F32, shape))], {"dtype": dtype.value})
    consts = [h.add(Op.CAST, [h.add(Op.CONST, attrs={"value": tuple(c.reshape(-1).tolist())},
                                    type=TensorType(DType.F32, c.shape))], {"dtype": dtype.value}) for c in extra]
    h.set_output("y", h.add(op, [x, *consts]))
    return verify(h)


def test_interpreter_rounds_to_node_dtypes_and_accumulates_in_f32() -> None:
    # elementwise ops run natively: 2048 + 1 is 2048 in f16
    big = np.asarray([[2048.0]], np.float32)
    assert _run(_graph(Op.ADD, DType.F16, (1, 1), np.ones((1, 1), np.float32)), x=big)[0, 0] == 2048
    # a bf16 dot product of 1 and 256 terms of 2^-9 is 1.5 accumulated in f32 (each term alone is
    # below half a bf16 ulp of 1, so a bf16 accumulator would stay at 1.0)
    row = np.asarray([[1.0] + [2.0 ** -9] * 256], np.float32)
    y = _run(_graph(Op.LINEAR, DType.BF16, row.shape, np.ones((1, row.shape[1]), np.float32)), x=row)
    assert y.dtype == DType.BF16.numpy and float(y[0, 0]) == 1.5


def test_interpreter_masks_with_the_scores_dtype_min() -> None:
    h = HIR()
    s = h.add(Op.CAST, [h.input("x", TensorType(DType.F32, (1, 1, 2, 2)))], {"dtype": "f16"})
    h.set_output("y", h.add(Op.CAUSAL_MASK, [s, h.input("pos", TensorType(DType.I64, (1, 2)))]))
    y = Interpreter(verify(h)).run({"x": np.zeros((1, 1, 2, 2), np.float32), "pos": np.asarray([[0, 1]])})["y"]
    assert y.dtype == np.float16 and y[0, 0, 0, 1] == np.finfo(np.float16).min  # not -inf: softmax stays finite


# ---- property: every op ends up in its class's dtype ----

@settings(max_examples=40, deadline=None)
@given(random_graphs(), st.sampled_from(["f16", "bf16"]), st.sampled_from(MIXED))
def test_property_ops_run_in_their_class_dtype(h: HIR, compute: str, mixed: str) -> None:
    p = Precision(compute=compute, mixed=mixed)
    out = p.run(h).hir
    verify(out)
    want = DType.parse(compute)
    assert {k: out.node(v).type for k, v in out.outputs.items()} == {k: h.node(v).type for k, v in h.outputs.items()}
    assert {k: n.type for k, n in out.inputs.items()} == {k: n.type for k, n in h.inputs.items()}
    casts = out.nodes_of(Op.CAST)
    assert {n.id for n in out.nodes()} - {c.id for c in casts} == {n.id for n in h.nodes()}  # only casts added
    for node in out.nodes():
        expect = DType.F32 if node.op in F32_OPS and mixed == "auto" else want
        if node.op in COMPUTE_OPS | F32_OPS:
            assert node.type.dtype == expect, node.id
            assert all(out.node(i).type.dtype == expect for i in node.inputs), node.id
    keys = [(c.inputs[0], c.type.dtype) for c in casts]
    assert len(keys) == len(set(keys))  # one cast per value and dtype
    assert all(out.node(c.inputs[0]).type.dtype != c.type.dtype for c in casts)  # never a no-op
    assert all(out.node(c.inputs[0]).op is not Op.CAST for c in casts)  # never a cast of a cast
    assert p.run(out).hir == out  # idempotent


# ---- tiny Gemmas ----

def _profile(compute: str, *, mixed: str = "auto", fused: bool = True, extra: str = "") -> Profile:
    fusion = "" if fused else "[fusion]\nskip = true\n"
    return parse_profile(f'[precision]\ncompute = "{compute}"\nmixed = "{mixed}"\n{fusion}{extra}')


def _logits(d: Path, profile: Profile | None = None) -> tuple[np.ndarray, HIR]:
    ckpt = open_checkpoint(d)
    flow = GemmaFlow(ckpt.config, ckpt.weights.shape).prefill().dynamic_seq()
    h, _ = optimize(flow.build(), "prefill", profile, config=ckpt.config)
    feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(len(PROMPT))[None]}
    return Interpreter(h, WeightCache(ckpt.weights)).run(feeds)["logits"][0], h


def bound(compute: str, num_layers: int, ref: np.ndarray) -> float:
    """The module docstring's tolerance."""
    return C * UNIT_ROUNDOFF[compute] * (num_layers + 2) * float(np.abs(ref).max())


def assert_within_bound(ours: np.ndarray, ref: np.ndarray, compute: str, num_layers: int) -> None:
    tol = bound(compute, num_layers, ref)
    err = float(np.abs(ours - ref).max())
    assert err <= tol, f"max |diff| {err:.4g} > bound {tol:.4g}"
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decisive = top2[..., 1] - top2[..., 0] > 2 * tol
    assert decisive.any()
    assert (ours.argmax(-1) == ref.argmax(-1))[decisive].all()


CASES = [  # (family, compute, mixed, fused)
    ("gemma1-gqa", "f16", "auto", True), ("gemma2", "f16", "auto", True), ("gemma2", "f16", "auto", False),
    ("gemma3", "f16", "off", True), ("gemma4-moe", "f16", "auto", True), ("gemma4-kvshare", "f16", "auto", True),
    ("gemma2", "bf16", "auto", True), ("gemma3", "bf16", "auto", False), ("gemma4-ple", "bf16", "off", True),
]


@pytest.mark.parametrize(("family", "compute", "mixed", "fused"), CASES)
def test_tiny_gemma_logits_within_the_rounding_bound(family: str, compute: str, mixed: str, fused: bool,
                                                     tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ref, _ = _logits(d)
    ours, h = _logits(d, _profile(compute, mixed=mixed, fused=fused))
    assert ours.dtype == np.float32 and any(n.type.dtype.value == compute for n in h.nodes_of(Op.LINEAR))
    assert_within_bound(ours, ref, compute, open_checkpoint(d).config.num_layers)


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_auto_keeps_norms_softmax_softcaps_f32(fused: bool, tiny_ckpt: Ckpt) -> None:
    """Gemma 2 has every kind: attention and final softcaps, four norms per layer."""
    _, h = _logits(tiny_ckpt("gemma2"), _profile("f16", fused=fused))
    kept = [n for n in h.nodes() if n.op in F32_OPS]
    assert {n.op for n in kept} >= ({Op.ADD_RMSNORM, Op.RMSNORM} if fused else
                                   {Op.RMSNORM, Op.SOFTMAX, Op.SOFTCAP, Op.CAUSAL_MASK, Op.ROPE})
    assert all(n.type.dtype is DType.F32 for n in kept)
    matmuls = [n for n in h.nodes() if n.op in (Op.LINEAR, Op.LINEAR_EPILOGUE, Op.MATMUL, Op.ATTENTION, Op.EMBED)]
    assert matmuls and all(n.type.dtype is DType.F16 for n in matmuls)
    if fused:
        assert all(n.type.dtype is DType.F16 for n in h.nodes_of(Op.ATTENTION))  # its softmax is f32 inside


def test_mixed_off_casts_the_norms_too(tiny_ckpt: Ckpt) -> None:
    _, h = _logits(tiny_ckpt("gemma2"), _profile("f16", mixed="off"))
    weights = static_nodes(h)  # the fused q|k|v and gate|up weight concats stay f32, cast after
    floats = [n for n in h.nodes() if n.op in COMPUTE_OPS | F32_OPS and n.id not in weights]
    assert floats and all(n.type.dtype is DType.F16 for n in floats)


def test_layer_dtype_patch_changes_exactly_that_layer(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    _, base = _logits(d, _profile("f16"))
    ref, f32 = _logits(d)
    ours, patched = _logits(d, _profile("f16", extra='[[layers]]\nindex = 1\ndtype = "f32"\n'))
    old = {n.id: n.type.dtype for n in base.nodes() if n.op is not Op.CAST}
    new = {n.id: n.type.dtype for n in patched.nodes() if n.op is not Op.CAST}
    assert old.keys() == new.keys()
    changed = {nid for nid in old if old[nid] != new[nid]}
    assert changed and all(nid.startswith("l1.") for nid in changed)
    layer1 = [n for n in patched.nodes() if n.id.startswith("l1.") and n.op in COMPUTE_OPS]
    assert layer1 and all(n.type.dtype is DType.F32 for n in layer1)
    assert_within_bound(ours, ref, "f16", 4)


def test_weights_are_cast_once_and_weight_only(tiny_ckpt: Ckpt) -> None:
    """Every cast of a weight reads the param (or the fused weight concat) directly, one per
    weight: the tied embedding / LM head table has one f16 copy."""
    _, h = _logits(tiny_ckpt("gemma3"), _profile("f16"))
    static = static_nodes(h)
    weight_casts = [c for c in h.nodes_of(Op.CAST) if c.inputs[0] in static]
    read = [c.inputs[0] for c in weight_casts]
    assert weight_casts and len(read) == len(set(read))
    table = h.node(h.params["p.embed_tokens.weight"].id)
    assert [u.op for u in h.users(table.id)] == [Op.CAST] and len(h.users(h.users(table.id)[0].id)) == 2
    matrices = [n for n in h.nodes() if n.op in (Op.LINEAR, Op.LINEAR_EPILOGUE)]
    assert all(h.node(n.inputs[1]).op is Op.CAST and n.inputs[1] in {c.id for c in weight_casts} for n in matrices)


def test_decode_graph_takes_and_returns_the_cache_in_the_compute_dtype(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    ckpt = open_checkpoint(d)
    prefill, decode = reference_graphs(ckpt, profile=_profile("f16"))
    assert {n: t.type.dtype for n, t in decode.inputs.items() if n.startswith("past_")} == \
        {f"past_{kv}.{i}": DType.F16 for kv in "kv" for i in range(4)}
    for g in (prefill, decode):
        types = {name: g.node(nid).type.dtype for name, nid in g.outputs.items()}
        assert types.pop("logits") is DType.F32 and set(types.values()) == {DType.F16}
    ref, ours = reference_engine(ckpt), reference_engine(ckpt, profile=_profile("f16"))
    rows = [(ref.prefill(PROMPT), ours.prefill(PROMPT))]
    rows += [(ref.step(t), ours.step(t)) for t in (3, 50, 7)]
    a, b = np.stack([r for r, _ in rows]), np.stack([o for _, o in rows])
    assert_within_bound(b, a, "f16", ckpt.config.num_layers)
