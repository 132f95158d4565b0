"""The Gemma frontend + reference interpreter against transformers on tiny random checkpoints.

Tolerance: float32 everywhere on both sides; the only differences are summation order in
matmuls and reductions (~1e-7 relative each), which after a few layers and a 256-way LM head stay
well under 1e-5. We assert rtol 1e-4 with an absolute floor of 1e-4 * max|logit|, so a real bug
(a missing (1+w), a wrong window, a wrong RoPE frequency) — which moves logits by >1e-2 — fails.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.compiler.engines import reference_engine
from rlx.errors import FlowError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow, LayerOverrides, identity_stage
from rlx.frontends.weights import WeightCache
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.runtime.generate import generate
from tests.fixtures.tiny import FAMILIES, hf_reference, reference_for_layers

PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]  # 10 tokens: longer than the sliding window (4)
N_DECODE = 8


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def _prefill_all(ckpt_dir: Path, flow_fn: Callable[[GemmaFlow], GemmaFlow] = lambda f: f,
                 ids: list[int] = PROMPT) -> dict[str, np.ndarray]:
    ckpt = open_checkpoint(ckpt_dir)
    hir = flow_fn(GemmaFlow(ckpt.config, ckpt.weights.shape).prefill().dynamic_seq()).build()
    feeds = {"input_ids": np.asarray([ids]), "positions": np.arange(len(ids))[None]}
    return Interpreter(hir, WeightCache(ckpt.weights)).run(feeds)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_decode_match_transformers(family: str, tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt(family)
    ref = hf_reference(d, PROMPT, N_DECODE)
    engine = reference_engine(open_checkpoint(d))
    rows = [engine.prefill(PROMPT)]
    for token in ref.tokens:  # feed transformers' own greedy tokens so both walk the same path
        rows.append(engine.step(token))
    ours = np.stack(rows)
    assert ours.shape == ref.logits.shape == (1 + N_DECODE, ref.logits.shape[1])
    assert_logits_close(ours, ref.logits)
    assert [int(t) for t in ours[:-1].argmax(-1)] == ref.tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma4"])
def test_all_position_logits_and_hidden(family: str, tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt(family)
    ref = hf_reference(d, PROMPT, 0)
    assert_logits_close(_prefill_all(d)["logits"][0], ref.prefill_logits)
    hidden = _prefill_all(d, lambda f: f.hidden_only())["hidden"][0]
    np.testing.assert_allclose(hidden, ref.hidden_last, rtol=1e-4, atol=1e-4 * float(np.abs(ref.hidden_last).max()))


def test_generate_loop_greedy_equals_transformers(tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt("gemma3")
    ref = hf_reference(d, PROMPT, N_DECODE)
    gen = generate(reference_engine(open_checkpoint(d)), PROMPT, N_DECODE + 1)
    assert gen.tokens[:N_DECODE] == ref.tokens
    assert gen.logits_array().shape == (N_DECODE + 1, ref.logits.shape[1])
    assert_logits_close(gen.logits_array(), ref.logits)


@pytest.mark.parametrize("k", [1, 2])
def test_keep_first_k_layers_matches_truncated_transformers(k: int, tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt("gemma3")
    ref = reference_for_layers(d, PROMPT, k)
    ours = _prefill_all(d, lambda f: f.keep_layers(k))["logits"][0]
    assert_logits_close(ours, ref)


@pytest.mark.parametrize("family", ["gemma2", "gemma4-ple"])
def test_prefill_from_hidden_equals_token_prefill(family: str, tiny_ckpt: Callable[[str], Path]) -> None:
    """PLE models also take `input_ids` (for the per-layer table); others take only the embeddings."""
    d = tiny_ckpt(family)
    ckpt = open_checkpoint(d)
    embed = ckpt.weights.get("embed_tokens.weight")[PROMPT] * np.float32(ckpt.config.hidden_size ** 0.5)
    hir = GemmaFlow(ckpt.config, ckpt.weights.shape).prefill_from_hidden().dynamic_seq().build()
    feeds = {"inputs_embeds": embed[None], "positions": np.arange(len(PROMPT))[None]}
    if ckpt.config.hidden_size_per_layer_input:
        feeds["input_ids"] = np.asarray([PROMPT])
    assert set(hir.inputs) == set(feeds)
    out = Interpreter(hir, WeightCache(ckpt.weights)).run(feeds)
    np.testing.assert_allclose(out["logits"], _prefill_all(d)["logits"], rtol=1e-5, atol=1e-5)


def test_custom_mask_reproduces_the_builtin_masks(tiny_ckpt: Callable[[str], Path]) -> None:
    """A custom additive mask equal to the causal mask gives the stock logits on a model without
    sliding layers (Gemma 1), and a different mask changes them."""
    d = tiny_ckpt("gemma1-gqa")
    n = len(PROMPT)
    causal = np.where(np.tril(np.ones((n, n), bool)), 0.0, np.finfo(np.float32).min).astype(np.float32)
    ckpt = open_checkpoint(d)
    hir = GemmaFlow(ckpt.config, ckpt.weights.shape).prefill().dynamic_seq().custom_mask().build()
    run = Interpreter(hir, WeightCache(ckpt.weights)).run
    feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(n)[None]}
    stock = _prefill_all(d)["logits"]
    np.testing.assert_allclose(run({**feeds, "attn_mask": causal[None, None]})["logits"], stock, rtol=1e-5, atol=1e-5)
    full = np.zeros_like(causal)
    assert not np.allclose(run({**feeds, "attn_mask": full[None, None]})["logits"], stock, atol=1e-3)


def test_window_override_changes_only_selected_layers(tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt("gemma3")
    ckpt = open_checkpoint(d)
    cfg = ckpt.config
    sliding = [i for i in range(cfg.num_layers) if cfg.is_sliding(i)]
    target = sliding[0]
    flow = GemmaFlow(cfg, ckpt.weights.shape).prefill().dynamic_seq()
    patched = flow.override_layers(lambda i, t: i == target, LayerOverrides(window=2)).build()
    stock = flow.build()
    masks = {n.id: n.attr("window") for n in stock.nodes() if n.op.value == "causal_mask"}
    masks2 = {n.id: n.attr("window") for n in patched.nodes() if n.op.value == "causal_mask"}
    changed = {k for k in masks if masks[k] != masks2[k]}
    assert changed == {f"l{target}.attn.mask"}
    assert masks2[f"l{target}.attn.mask"] == 2


def test_kv_export_has_per_layer_shapes(tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt("gemma4")
    ckpt = open_checkpoint(d)
    cfg = ckpt.config
    out = _prefill_all(d, lambda f: f.export_kv())
    for i in range(cfg.num_layers):
        assert out[f"present_k.{i}"].shape == (1, cfg.layer_kv_heads(i), len(PROMPT), cfg.layer_head_dim(i))
        assert out[f"present_v.{i}"].shape == out[f"present_k.{i}"].shape
    assert len({cfg.layer_head_dim(i) for i in range(cfg.num_layers)}) == 2  # the fixture really mixes them


def test_kv_shared_layers_have_no_cache_of_their_own(tiny_ckpt: Callable[[str], Path]) -> None:
    """KV-shared layers export nothing and take no past; producers' exports keep their per-layer shapes."""
    d = tiny_ckpt("gemma4-kvshare")
    ckpt = open_checkpoint(d)
    cfg = ckpt.config
    own = [i for i in range(cfg.num_layers) if not cfg.is_kv_shared(i)]
    assert own == [0, 1] and [cfg.kv_source_layer(i) for i in (2, 3)] == [0, 1]
    out = _prefill_all(d, lambda f: f.export_kv())
    assert {k for k in out if k.startswith("present_")} == {f"present_{kv}.{i}" for kv in "kv" for i in own}
    for i in own:
        assert out[f"present_k.{i}"].shape == (1, cfg.layer_kv_heads(i), len(PROMPT), cfg.layer_head_dim(i))
        assert out[f"present_v.{i}"].shape == out[f"present_k.{i}"].shape
    decode = GemmaFlow(cfg, ckpt.weights.shape).decode().dynamic_past().export_kv().build()
    assert set(decode.inputs) == {"input_ids", "positions"} | {f"past_{kv}.{i}" for kv in "kv" for i in own}
    assert {k for k in decode.outputs if k.startswith("present_")} == {f"present_{kv}.{i}" for kv in "kv"
                                                                     for i in own}
    params = {n.attr("name"): n.type.shape for n in decode.nodes_of(Op.PARAM)}
    assert not any(name.startswith(("layers.2.self_attn.k", "layers.3.self_attn.k")) for name in params)
    assert params["layers.2.mlp.up_proj.weight"] == (2 * cfg.intermediate_size, cfg.hidden_size)
    assert params["layers.1.mlp.up_proj.weight"] == (cfg.intermediate_size, cfg.hidden_size)


def test_kv_shared_layer_needs_its_producer(tiny_ckpt: Callable[[str], Path]) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma4-kvshare"))
    flow = GemmaFlow(ckpt.config, ckpt.weights.shape).layer(lambda ctx: identity_stage if ctx.index == 1 else None)
    with pytest.raises(FlowError, match="layer 3 reuses the K/V of layer 1"):
        flow.build()
    GemmaFlow(ckpt.config, ckpt.weights.shape).keep_layers(2).build()  # dropping the sharers too is fine


def test_dynamic_seq_needs_batch_one(tiny_ckpt: Callable[[str], Path]) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma1-mqa"))
    with pytest.raises(FlowError, match="dynamic_seq needs batch 1"):
        GemmaFlow(ckpt.config, ckpt.weights.shape).batch(2).prefill().dynamic_seq().build()
    GemmaFlow(ckpt.config, ckpt.weights.shape).batch(2).prefill(seq=4).build()  # static seq is fine


def test_batched_static_prefill_equals_single(tiny_ckpt: Callable[[str], Path]) -> None:
    d = tiny_ckpt("gemma2")
    ckpt = open_checkpoint(d)
    hir = GemmaFlow(ckpt.config, ckpt.weights.shape).batch(2).prefill(seq=len(PROMPT)).build()
    other = list(reversed(PROMPT))
    out = Interpreter(hir, WeightCache(ckpt.weights)).run(
        {"input_ids": np.asarray([PROMPT, other]), "positions": np.tile(np.arange(len(PROMPT)), (2, 1))})
    np.testing.assert_allclose(out["logits"][0], _prefill_all(d)["logits"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"][1], _prefill_all(d, ids=other)["logits"][0], rtol=1e-5, atol=1e-5)


GGUF_FAMILIES = {"gemma1-gqa": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma4": "gemma4",
                 "gemma4-moe": "gemma4"}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_tiny_gguf_gives_the_checkpoints_logits(family: str, tiny_ckpt: Callable[[str], Path],
                                                tmp_path: Path) -> None:
    """A GGUF written with gguf.GGUFWriter (llama.cpp names, +1 norm shift) runs like its source checkpoint."""
    from tests.fixtures.gguf_writer import write_gguf_from_hf

    d = tiny_ckpt(family)
    gguf_path = write_gguf_from_hf(d, tmp_path / f"{family}.gguf", arch=GGUF_FAMILIES[family])
    ref = hf_reference(d, PROMPT, 4)
    engine = reference_engine(open_checkpoint(gguf_path))
    rows = [engine.prefill(PROMPT), *(engine.step(t) for t in ref.tokens)]
    assert_logits_close(np.stack(rows), ref.logits)
