"""GemmaConfig against transformers' own config classes and modules, per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaRotaryEmbedding
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4TextAttention,
    Gemma4TextMLP,
    Gemma4TextRotaryEmbedding,
)

from rlx.errors import ConfigError
from rlx.frontends.config import FULL, SLIDING, GemmaConfig, RopeSpec
from rlx.frontends.gguf_config import gguf_config
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.hf_config import hf_config_from_dict, read_hf_config

_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128)
# generation -> (attention module, rotary module); per-type rope buffers from Gemma 3 on
_MODULES = {
    1: (GemmaAttention, GemmaRotaryEmbedding),
    2: (Gemma2Attention, Gemma2RotaryEmbedding),
    3: (Gemma3Attention, Gemma3RotaryEmbedding),
    4: (Gemma4TextAttention, Gemma4TextRotaryEmbedding),
}


def _tf(d: dict[str, Any]) -> Any:
    """transformers' config from the same dict (what from_pretrained would build)."""
    return CONFIG_MAPPING[d["model_type"]].from_dict(json.loads(json.dumps(d)))


def _gemma3_wrapper() -> dict[str, Any]:
    text = transformers.Gemma3TextConfig(**_SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=32,
                                         sliding_window=512, query_pre_attn_scalar=40)
    return transformers.Gemma3Config(text_config=text.to_dict()).to_dict()


def _gemma4_text(**extra: Any) -> dict[str, Any]:
    return transformers.Gemma4TextConfig(
        **_SMALL, num_hidden_layers=6, num_key_value_heads=2, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=1, attention_k_eq_v=True, final_logit_softcapping=30.0,
        layer_types=[SLIDING, FULL] * 3, **extra,
    ).to_dict()


# every model type, in the spellings real config.json files use
CASES: dict[str, dict[str, Any]] = {
    "gemma-legacy-gelu": {"model_type": "gemma", **_SMALL, "num_hidden_layers": 2, "num_key_value_heads": 1,
                          "hidden_act": "gelu"},
    "gemma-to_dict": transformers.GemmaConfig(**_SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                              head_dim=24).to_dict(),
    "gemma2-defaults": {"model_type": "gemma2", **_SMALL, "num_hidden_layers": 5},
    "gemma2-to_dict": transformers.Gemma2Config(**_SMALL, num_hidden_layers=3, head_dim=32,
                                                query_pre_attn_scalar=24, sliding_window=16).to_dict(),
    "gemma3_text-rope_parameters": transformers.Gemma3TextConfig(
        **_SMALL, num_hidden_layers=7, sliding_window=512, rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        }).to_dict(),
    "gemma3_text-legacy": {"model_type": "gemma3_text", **_SMALL, "num_hidden_layers": 7, "rope_theta": 500_000.0,
                           "rope_local_base_freq": 20_000.0, "rope_scaling": {"type": "linear", "factor": 8.0},
                           "sliding_window_pattern": 3, "sliding_window": 1024},
    "gemma3_text-defaults": {"model_type": "gemma3_text", **_SMALL, "num_hidden_layers": 6},
    "gemma3": _gemma3_wrapper(),
    "gemma4_text-hub": {**{k: v for k, v in _gemma4_text(num_kv_shared_layers=2).items()
                           if k != "per_layer_config"}, "global_head_dim": 512, "num_global_key_value_heads": 1},
    "gemma4_text-to_dict": _gemma4_text(hidden_size_per_layer_input=16),
    "gemma4_text-moe": _gemma4_text(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                                    num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=0),
    "gemma4_text-defaults": {"model_type": "gemma4_text", **_SMALL, "num_hidden_layers": 3},
    "gemma4": transformers.Gemma4Config(text_config=_gemma4_text()).to_dict(),
}


def _rope_buffer(rope: Any, gen: int, layer_type: str) -> np.ndarray:
    buf = rope.inv_freq if gen < 3 else getattr(rope, f"{layer_type}_inv_freq")
    return buf.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_per_layer(case: str) -> None:
    d = CASES[case]
    ours = hf_config_from_dict(d, source=f"{case}.json")
    tf = _tf(d).get_text_config()
    attn_cls, rope_cls = _MODULES[ours.generation]
    assert ours.model_type == d["model_type"]
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads) == (
        tf.vocab_size, tf.hidden_size, tf.intermediate_size, tf.num_hidden_layers, tf.num_attention_heads)
    assert ours.rms_norm_eps == tf.rms_norm_eps and ours.max_position_embeddings == tf.max_position_embeddings
    assert ours.final_softcap == getattr(tf, "final_logit_softcapping", None)
    assert ours.attn_softcap == getattr(tf, "attn_logit_softcapping", None)
    assert ours.hidden_activation == getattr(tf, "hidden_activation" if ours.generation > 1 else "hidden_act")
    assert (ours.bos_token_id, ours.pad_token_id) == (tf.bos_token_id, tf.pad_token_id)
    assert list(ours.eos_token_ids) == ([tf.eos_token_id] if isinstance(tf.eos_token_id, int) else tf.eos_token_id)
    assert ours.tie_word_embeddings == _tf(d).tie_word_embeddings
    assert list(ours.layer_types) == list(getattr(tf, "layer_types", None) or [FULL] * tf.num_hidden_layers)
    rope = rope_cls(tf)
    for i in range(ours.num_layers):
        attn = attn_cls(tf, i)
        assert ours.layer_head_dim(i) == attn.head_dim, i
        assert ours.layer_kv_heads(i) == tf.num_attention_heads // attn.num_key_value_groups, i
        assert ours.score_scale(i) == pytest.approx(attn.scaling, rel=1e-12), i
        assert ours.window(i) == getattr(attn, "sliding_window", None), i
        freqs = ours.layer_rope(i).inv_freq(ours.layer_head_dim(i))
        # float64-rounded powers vs torch's 1-ulp SIMD pow (see RopeSpec.inv_freq)
        np.testing.assert_array_max_ulp(freqs, _rope_buffer(rope, ours.generation, ours.layer_type(i)), maxulp=2)
    if ours.generation == 4:
        assert (ours.enable_moe_block, ours.num_experts, ours.top_k_experts, ours.moe_intermediate_size) == (
            tf.enable_moe_block, tf.num_experts, tf.top_k_experts, tf.moe_intermediate_size)
        assert ours.hidden_size_per_layer_input == (tf.hidden_size_per_layer_input or 0)
        assert ours.vocab_size_per_layer_input == (tf.vocab_size_per_layer_input if ours.hidden_size_per_layer_input
                                                   else 0)
        for i in range(ours.num_layers):
            attn = Gemma4TextAttention(tf, i)
            assert ours.layer_k_eq_v(i) == attn.use_alternative_attention
            assert ours.is_kv_shared(i) == attn.is_kv_shared_layer
            assert ours.layer_intermediate_size(i) == Gemma4TextMLP(tf, i).intermediate_size
    assert ours.norm_shift == (0.0 if ours.generation == 4 else 1.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_dict_round_trips_and_hashes(case: str) -> None:
    ours = hf_config_from_dict(CASES[case])
    again = GemmaConfig.from_dict(json.loads(json.dumps(ours.to_dict())))
    assert again == ours and hash(again) == hash(ours)
    assert isinstance(ours.rope[ours.layer_type(0)], RopeSpec)
    with pytest.raises(TypeError):
        ours.rope["x"] = ours.rope[ours.layer_type(0)]  # type: ignore[index]


@pytest.mark.parametrize("case", ["gemma2-to_dict", "gemma3", "gemma4_text-moe", "gemma4"])
def test_from_hf_file_reads_save_pretrained_output(case: str, tmp_path: Path) -> None:
    _tf(CASES[case]).save_pretrained(tmp_path)
    assert read_hf_config(tmp_path) == hf_config_from_dict(CASES[case])
    assert read_hf_config(tmp_path / "config.json") == hf_config_from_dict(CASES[case])


def test_gemma4_last_layer_forced_full_and_proportional_rope() -> None:
    d = {**CASES["gemma4_text-defaults"], "layer_types": [SLIDING] * 3}
    ours = hf_config_from_dict(d)
    assert ours.layer_types == (SLIDING, SLIDING, FULL)
    full = ours.layer_rope(2)
    assert (full.kind, full.partial_rotary_factor, full.theta) == ("proportional", 0.25, 1_000_000.0)
    freqs = full.inv_freq(512)
    assert freqs.shape == (256,) and np.count_nonzero(freqs) == 64 and freqs[0] == 1.0
    assert ours.layer_head_dim(2) == 512 and ours.layer_head_dim(0) == 256
    assert ours.score_scale(0) == 1.0


@pytest.mark.parametrize(("theta", "kind", "factor"), [(10_000.0, "default", 1.0), (1_000_000.0, "linear", 8.0),
                                                        (1234.5, "default", 1.0)])
def test_rope_inv_freq_formula(theta: float, kind: str, factor: float) -> None:
    freqs = RopeSpec(theta, kind, factor).inv_freq(256)
    expected = 1.0 / (np.float64(np.float32(theta)) ** (np.arange(0, 256, 2) / 256.0)) / factor
    assert freqs.dtype == np.float32 and freqs.shape == (128,)
    np.testing.assert_allclose(freqs, expected, rtol=2e-7)


# ---- bad inputs ----------------------------------------------------------------------------


def _error(d: dict[str, Any], source: str = "bad/config.json") -> str:
    with pytest.raises(ConfigError) as info:
        hf_config_from_dict(d, source=source)
    return str(info.value)


def test_unknown_model_type_lists_supported() -> None:
    msg = _error({"model_type": "llama", **_SMALL, "num_hidden_layers": 2})
    assert "'llama'" in msg and "bad/config.json" in msg
    for supported in ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text"):
        assert supported in msg


def test_missing_required_field_names_field_and_file() -> None:
    d = {k: v for k, v in CASES["gemma2-defaults"].items() if k != "hidden_size"}
    msg = _error(d)
    assert "'hidden_size'" in msg and "bad/config.json" in msg and "fix: set 'hidden_size'" in msg
    wrapper = json.loads(json.dumps(CASES["gemma3"]))
    del wrapper["text_config"]["num_hidden_layers"]
    assert "'text_config.num_hidden_layers'" in _error(wrapper)


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden_size": "big"}, "'hidden_size'"),
    ({"layer_types": [SLIDING]}, "layer_types"),
    ({"layer_types": [SLIDING, "dilated_attention", FULL, FULL, FULL]}, "dilated_attention"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_bad_values_are_named(change: dict[str, Any], needle: str) -> None:
    msg = _error({**CASES["gemma2-defaults"], **change})
    assert needle in msg and "bad/config.json" in msg


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "gemma",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ConfigError) as info:
        read_hf_config(tmp_path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    with pytest.raises(ConfigError, match="no config file"):
        read_hf_config(tmp_path / "nowhere")


def test_from_dict_rejects_unknown_keys() -> None:
    d = hf_config_from_dict(CASES["gemma2-defaults"]).to_dict()
    with pytest.raises(ConfigError, match="surprise"):
        GemmaConfig.from_dict({**d, "surprise": 1})


# ---- GGUF metadata -------------------------------------------------------------------------


def _meta_gguf(path: Path, arch: str, *, n_layers: int = 6, vocab: int = 32, output: bool = False,
               **extra: Any) -> Path:
    """A tensor-light GGUF with llama.cpp's metadata keys (extra: key suffix -> value)."""
    w = gguf.GGUFWriter(str(path), arch)
    base = {"context_length": 4096, "embedding_length": 64, "block_count": n_layers, "feed_forward_length": 128,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
            "attention.layer_norm_rms_epsilon": 1e-6}
    for key, value in {**base, **extra}.items():
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        elif isinstance(value, list):
            w.add_array(full, value)
        else:
            w.add_uint32(full, value)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    if output:
        w.add_tensor("output.weight", np.zeros((vocab, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_config(path: Path) -> GemmaConfig:
    return gguf_config(GGUFFile.from_reader(gguf.GGUFReader(path)), source=str(path))


def test_gguf_gemma3_defaults_follow_llama_cpp(tmp_path: Path) -> None:
    cfg = _gguf_config(_meta_gguf(tmp_path / "m.gguf", "gemma3", n_layers=7, **{"attention.sliding_window": 512,
                                                                                  "rope.freq_base": 1e6}))
    assert cfg.layer_types == (SLIDING,) * 5 + (FULL, SLIDING)  # no pattern key: period 6
    assert cfg.rope[SLIDING].theta == 10_000.0 and cfg.rope[FULL].theta == 1e6
    assert cfg.score_scale(0) == 16 ** -0.5 and cfg.vocab_size == 32 and cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == 1e-6 and cfg.eos_token_ids == (1,) and cfg.bos_token_id == 2


def test_gguf_gemma3_27b_scale_pattern_and_linear_scaling(tmp_path: Path) -> None:
    cfg = _gguf_config(_meta_gguf(tmp_path / "m.gguf", "gemma3", n_layers=62, output=True, **{
        "attention.sliding_window": 1024, "attention.sliding_window_pattern": 3, "rope.scaling.type": "linear",
        "rope.scaling.factor": 8.0, "attention.head_count": 32, "embedding_length": 5376,
        "attention.key_length": 128}))
    assert cfg.query_pre_attn_scalar == 168 and not cfg.tie_word_embeddings
    assert cfg.layer_types[:3] == (SLIDING, SLIDING, FULL)
    assert cfg.rope[FULL] == RopeSpec(1_000_000.0, "linear", 8.0) and cfg.rope[SLIDING].kind == "default"


def test_gguf_gemma2_and_gemma1(tmp_path: Path) -> None:
    g2 = _gguf_config(_meta_gguf(tmp_path / "g2.gguf", "gemma2", n_layers=4, **{
        "attention.sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}))
    assert g2.layer_types == (SLIDING, FULL, SLIDING, FULL) and (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)
    assert g2.window(0) == 4096 and g2.window(1) is None
    g1 = _gguf_config(_meta_gguf(tmp_path / "g1.gguf", "gemma", n_layers=2))
    assert g1.generation == 1 and g1.layer_types == (FULL, FULL) and g1.rope[FULL].theta == 10_000.0
    assert g1.score_scale(0) == 16 ** -0.5 and g1.final_softcap is None


def test_gguf_not_gemma_and_missing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Gemma GGUF.*'llama'"):
        _gguf_config(_meta_gguf(tmp_path / "l.gguf", "llama"))
    with pytest.raises(ConfigError, match="gemma3.embedding_length") as info:
        _gguf_config(_meta_gguf(tmp_path / "m.gguf", "gemma3", embedding_length=None))
    assert str(tmp_path / "m.gguf") in str(info.value)


def test_real_gemma3_270m_gguf(real_gguf_path: Path) -> None:
    from rlx.frontends.gguf_file import GGUFFile

    cfg = gguf_config(GGUFFile.open(real_gguf_path), source=str(real_gguf_path))
    assert (cfg.generation, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (3, 640, 2048, 18)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.query_pre_attn_scalar) == (4, 1, 256, 256)
    assert cfg.vocab_size == 262144 and cfg.sliding_window == 512 and cfg.rms_norm_eps == 1e-6
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert (cfg.rope[FULL].theta, cfg.rope[SLIDING].theta) == (1e6, 1e4)
    assert cfg.attn_softcap is None and cfg.final_softcap is None and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (2, (1,), 0)
