"""HIR -> Relax lowering, without compiling: calling convention, hoisted weights, symbolic dims,
every op has a lowering, MoE routes to k experts."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tvm import relax, tirx

from rlx.compiler.graphs import reference_graphs
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.weights import WeightCache
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.passes import DEFAULT_PIPELINE
from rlx.targets.layouts import IL16, pack
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
    assert [n for n, _ in sig.inputs] == ["input_ids", "positions"]  # the past_* inputs became caches
    layers = range(ckpt.config.num_layers)
    assert [n for n, _ in sig.caches] == [f"cache_{kv}.{i}" for kv in "kv" for i in layers]  # natural order
    assert sig.dims == ("PAST_SEQ",)
    assert [p.key for p in sig.params] == sorted(p.key for p in sig.params)
    assert sig.outputs == tuple(decode.outputs)
    fn = low.mod["decode"]
    assert len(fn.params) == len(sig.inputs) + len(sig.caches) + 1 + len(sig.params)
    caps = {str(fn.params[len(sig.inputs) + i].ty.shape.values[2]) for i in range(len(sig.caches))}
    assert caps == {"KV_CAP"}  # one capacity var shared by every cache buffer
    dims = fn.params[len(sig.inputs) + len(sig.caches)]
    assert isinstance(dims.ty, relax.ShapeType) and [str(v) for v in dims.ty.values] == ["PAST_SEQ"]
    out = fn.ret_ty.fields[list(sig.outputs).index("present_k.0")]
    assert str(out.shape.values[2]) == "KV_CAP"  # the present output is the buffer itself
    pre = low.signatures["prefill"]
    assert pre.caches == sig.caches and pre.dims == ("PAST_SEQ",)  # a prefill appends a chunk, as a step does
    seq = low.mod["prefill"].params[0].ty.shape.values[1]
    assert isinstance(seq, tirx.Var) and seq.name == "SEQ"
    assert {gv.name_hint for gv, f in low.mod.functions_items() if isinstance(f, relax.Function)} == \
        {"prefill", "decode"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sliding_window_caches_are_rings_on_cpu(tiny_ckpt: Ckpt, device: str) -> None:
    """Fused attention on CPU (the flash kernel, which reads keys modulo the buffer) makes each
    sliding-window layer's cache a ring with its own capacity symbol; full layers, and every
    cache on a GPU (materialised readers), keep KV_CAP."""
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    cfg = ckpt.config
    prefill, decode = reference_graphs(ckpt, passes=DEFAULT_PIPELINE)
    sigs = lower({"prefill": prefill, "decode": decode}, device).signatures
    for sig in sigs.values():
        caps = {name: str(t.shape[2]) for name, t in sig.caches}
        want = {f"cache_{kv}.{i}": f"KV_WINDOW_{cfg.window(i)}" if cfg.window(i) and device == "cpu" else "KV_CAP"
                for kv in "kv" for i in range(cfg.num_layers)}
        assert caps == want and len(set(want.values())) == (2 if device == "cpu" else 1)


def _calls(text: str, op: str, *also: str) -> list[str]:
    return [ln for ln in text.splitlines() if op in ln and all(a in ln for a in also)]


def test_kv_cache_is_written_in_place_and_never_copied(tiny_ckpt: Ckpt) -> None:
    """Fused decode: each layer's new K and V rows go into the caller's buffer with one
    call_tir_inplace; no concat and no slice of a cache anywhere. Unfused graphs read the cache
    through a materialized prefix (their transpose/matmul cannot take a buffer + length)."""
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    fused = lower({"decode": reference_graphs(ckpt, passes=DEFAULT_PIPELINE)[1]}).mod["decode"].script(
        show_meta=False)
    writes = _calls(fused, "R.call_tir_inplace(")
    assert len(writes) == 2 * ckpt.config.num_layers and all("kv_write_float32" in w for w in writes)
    assert not _calls(fused, "R.concat(") and not _calls(fused, "R.strided_slice(", "PAST_SEQ")
    plain = lower({"decode": reference_graphs(ckpt)[1]}).mod["decode"].script(show_meta=False)
    assert len(_calls(plain, "R.call_tir_inplace(")) == 2 * ckpt.config.num_layers
    prefixes = _calls(plain, "R.strided_slice(", "PAST_SEQ + 1")
    assert not _calls(plain, "R.concat(") and len(prefixes) == 2 * ckpt.config.num_layers


def test_sliding_layers_read_only_their_window_of_the_cache(tiny_ckpt: Ckpt) -> None:
    """GPU (materialised scores): decode scores of a sliding layer (window 4 in the fixture) span
    min(PAST_SEQ + 1, 4) keys: the rows below PAST_SEQ - 3 are never read; full layers span all
    PAST_SEQ + 1. CPU: each layer calls the flash kernel generated for its window (which visits
    only the key tiles inside it: tests/targets/test_flash_attention.py)."""
    from rlx.targets.flash_attention import FLASH_ATTR, FlashSpec

    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    cfg = ckpt.config
    graph = reference_graphs(ckpt, passes=DEFAULT_PIPELINE)[1]
    text = lower({"decode": graph}, "cuda").mod["decode"].script(show_meta=False)
    spans = [re.search(r"R\.Tensor\(\(1, 4, 1, (.*)\), dtype", ln).group(1)  # type: ignore[union-attr]
             for ln in _calls(text, "R.call_tir(attention_scores")]
    window = cfg.sliding_window
    want = [f"PAST_SEQ + 1 - T.max(0, PAST_SEQ - {window - 1})" if cfg.layer_type(i) == "sliding_attention"
            else "PAST_SEQ + 1" for i in range(cfg.num_layers)]
    assert spans == want
    mod = lower({"decode": graph}).mod
    calls = [re.search(r"R\.call_tir\((\w+),", ln).group(1)  # type: ignore[union-attr]
             for ln in _calls(mod["decode"].script(show_meta=False), "R.call_tir(flash_attention")]
    windows = [FlashSpec.from_json(str(mod[name].attrs[FLASH_ATTR])).window for name in calls]
    assert windows == [window if cfg.layer_type(i) == "sliding_attention" else 0 for i in range(cfg.num_layers)]


def test_kv_cache_plan_rejects_a_past_input_read_elsewhere() -> None:
    from rlx.errors import HIRError
    from rlx.hir.conventions import KVSlot, record_kv
    from rlx.hir.dtypes import DType
    from rlx.hir.graph import HIR
    from rlx.hir.shapes import PAST_SEQ, sym
    from rlx.hir.tensor_type import TensorType
    from rlx.targets.kv_cache import plan

    hir = HIR("bad")
    past = hir.input("past_k.0", TensorType(DType.F32, (1, 1, sym(PAST_SEQ), 4)))
    new = hir.input("k", TensorType(DType.F32, (1, 1, 1, 4)))
    hir.set_output("present_k.0", hir.add(Op.CONCAT, (past, new), {"axis": 2}))
    hir.set_output("other", hir.add(Op.SCALE, (past,), {"value": 2.0}))
    record_kv(hir, [KVSlot(0, "k", "past_k.0", "present_k.0")])
    with pytest.raises(HIRError, match=r"past_k.0.*read by"):
        plan(hir)


def test_weight_only_work_is_hoisted_to_load_time(tiny_ckpt: Ckpt) -> None:
    """After fusion, q|k|v and gate|up weights are concats of params and the norm weights are
    derived (1 + w): none of that is lowered; each is one precomputed param, shared by key."""
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    prefill, decode = reference_graphs(ckpt, passes=DEFAULT_PIPELINE)
    low = lower({"prefill": prefill, "decode": decode})
    assert not _calls(low.mod["decode"].script(show_meta=False), "R.concat(")  # q|k|v concat: load time
    specs = param_keys(list(low.signatures.values()))
    qkv = [s for s in specs.values() if s.key.startswith("concat") and "q_proj" in s.key]
    derived = [s for s in specs.values() if "*1.0+1.0" in s.key]
    assert len(qkv) == ckpt.config.num_layers and derived
    assert {p.key for p in low.signatures["prefill"].params} & {p.key for p in low.signatures["decode"].params}
    weights = WeightCache(ckpt.weights)
    spec = qkv[0]
    value = spec.materialize(weights)
    names = [f"layers.0.self_attn.{k}_proj.weight" for k in "qkv"]
    # materialised in the layout its kernels read (CPU: 16 rows interleaved, `layouts.IL16`)
    assert spec.layout == IL16
    np.testing.assert_array_equal(value, pack(np.concatenate([weights(n) for n in names]), IL16))
    node = next(nid for nid in weight_only(decode) if decode.node(nid).op is Op.CONCAT)
    assert node not in {n for n in decode.nodes() if n.op is Op.INPUT}
    ref = Interpreter(spec.program, weights).run({})["value"]
    np.testing.assert_array_equal(value, pack(ref, IL16))


def test_moe_runs_only_top_k_experts(tiny_ckpt: Ckpt) -> None:
    """Routing is top-k selection plus expert weights gathered by index: the expert contractions
    produce [tokens, top_k, ...], never [tokens, num_experts, ...]. The selection is our kernel
    (`kernels.topk`), not Relax's topk, whose sort library call the runtime-only library lacks."""
    ckpt = open_checkpoint(tiny_ckpt("gemma4-moe"))
    cfg = ckpt.config
    assert cfg.top_k_experts < cfg.num_experts
    _, decode = reference_graphs(ckpt)
    text = lower({"decode": decode}).mod["decode"].script(show_meta=False)
    k = cfg.top_k_experts
    picks = _calls(text, "R.call_tir(topk", f'R.Tensor((1, {k}), dtype="float32"), R.Tensor((1, {k}), dtype="int64")')
    assert len(picks) == cfg.num_layers and "R.topk(" not in text
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
