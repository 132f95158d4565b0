"""HIR -> Relax lowering, without compiling: calling convention, hoisted weights, symbolic dims,
every op has a lowering, MoE routes to k experts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tvm import relax, tirx

from rlx.compiler.interpreter import Interpreter
from rlx.compiler.ops import Op
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.reference import WeightCache, reference_graphs
from rlx.targets.lower import LOWERINGS, lower, param_keys, weight_only

Ckpt = Callable[[str], Path]


def test_every_computing_op_has_a_lowering() -> None:
    leaves = {Op.INPUT, Op.PARAM, Op.CONST, Op.RESULT}
    assert set(Op) - leaves == set(LOWERINGS)


def test_calling_convention_and_symbolic_dims(tiny_ckpt: Ckpt) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    prefill, decode = reference_graphs(ckpt)
    low = lower({"prefill": prefill, "decode": decode})
    sig = low.signatures["decode"]
    names = [n for n, _ in sig.inputs]
    assert names[:2] == ["input_ids", "past_k.0"] and names[-1] == "positions"  # sorted, natural order
    assert [p.key for p in sig.params] == sorted(p.key for p in sig.params)
    assert sig.outputs == tuple(decode.outputs)
    fn = low.mod["decode"]
    assert len(fn.params) == len(sig.inputs) + len(sig.params)
    past = {str(fn.params[i].ty.shape.values[2]) for i, n in enumerate(names) if n.startswith("past_")}
    assert past == {"PAST_SEQ"}  # one var shared by every cache input
    out = fn.ret_ty.fields[list(sig.outputs).index("present_k.0")]
    assert str(out.shape.values[2]).replace("T.int64(1)", "1") == "PAST_SEQ + 1"
    seq = low.mod["prefill"].params[names.index("input_ids")].ty.shape.values[1]
    assert isinstance(seq, tirx.Var) and seq.name == "SEQ"
    assert {gv.name_hint for gv, f in low.mod.functions_items() if isinstance(f, relax.Function)} == \
        {"prefill", "decode"}


def test_weight_only_work_is_hoisted_to_load_time(tiny_ckpt: Ckpt) -> None:
    """After fusion, q|k|v and gate|up weights are concats of params and the norm weights are
    derived (1 + w): none of that is lowered; each is one precomputed param, shared by key."""
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    prefill, decode = reference_graphs(ckpt, passes=DEFAULT_PIPELINE)
    low = lower({"prefill": prefill, "decode": decode})
    concats = [ln for ln in low.mod["decode"].script(show_meta=False).splitlines() if "R.concat(" in ln]
    assert concats and all("past_" in ln for ln in concats)  # only the KV cache is concatenated per call
    specs = param_keys(list(low.signatures.values()))
    qkv = [s for s in specs.values() if s.key.startswith("concat") and "q_proj" in s.key]
    derived = [s for s in specs.values() if "*1.0+1.0" in s.key]
    assert len(qkv) == ckpt.config.num_layers and derived
    assert {p.key for p in low.signatures["prefill"].params} & {p.key for p in low.signatures["decode"].params}
    weights = WeightCache(ckpt)
    spec = qkv[0]
    value = spec.materialize(weights)
    names = [f"layers.0.self_attn.{k}_proj.weight" for k in "qkv"]
    np.testing.assert_array_equal(value, np.concatenate([weights(n) for n in names]))
    node = next(nid for nid in weight_only(decode) if decode.node(nid).op is Op.CONCAT)
    assert node not in {n for n in decode.nodes() if n.op is Op.INPUT}
    ref = Interpreter(spec.program, weights).run({})["value"]
    np.testing.assert_array_equal(value, ref)


def test_moe_runs_only_top_k_experts(tiny_ckpt: Ckpt) -> None:
    """Routing is top-k selection plus expert weights gathered by index: the expert contractions
    produce [tokens, top_k, ...], never [tokens, num_experts, ...]."""
    ckpt = open_checkpoint(tiny_ckpt("gemma4-moe"))
    cfg = ckpt.config
    assert cfg.top_k_experts < cfg.num_experts
    _, decode = reference_graphs(ckpt)
    text = lower({"decode": decode}).mod["decode"].script(show_meta=False)
    assert "R.topk(" in text and f"k={cfg.top_k_experts}" in text
    calls = [ln for ln in text.splitlines() if "call_tir(moe_gate_up" in ln or "call_tir(moe_down" in ln]
    assert len(calls) == 2 * cfg.num_layers
    inter = cfg.moe_intermediate_size
    assert all(f"(1, {cfg.top_k_experts}, {2 * inter})" in ln for ln in calls if "moe_gate_up" in ln)
    assert not any(f"(1, {cfg.num_experts}, " in ln for ln in calls)


@pytest.mark.parametrize("function", ["1bad", "with space"])
def test_function_names_must_be_identifiers(function: str, tiny_ckpt: Ckpt) -> None:
    from rlx.errors import HIRError

    prefill, _ = reference_graphs(open_checkpoint(tiny_ckpt("gemma1-gqa")))
    with pytest.raises(HIRError):
        lower({function: prefill})
