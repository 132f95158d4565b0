"""Malformed model files at the frontend boundary: each is a ConfigError / WeightError that names
the key, tensor or file at fault and carries a fix (`hint`), never a traceback from deep inside."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from rlx.errors import ConfigError, RlxError, WeightError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.config import FULL, SLIDING, GemmaConfig
from rlx.frontends.hf_config import hf_config_from_dict, read_hf_config
from rlx.frontends.safetensors_file import read_header
from rlx.frontends.weights import WeightStore
from tests.fixtures.gguf_writer import MINIMAL_GEMMA3, T, write_gguf

_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 128}
GEMMA2 = {"model_type": "gemma2", **_SMALL, "num_hidden_layers": 4}
GEMMA3 = {"model_type": "gemma3_text", **_SMALL, "num_hidden_layers": 6, "sliding_window": 16}
GEMMA4 = {"model_type": "gemma4_text", **_SMALL, "num_hidden_layers": 6}
GEMMA4_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}


def _raises(error: type[RlxError], call: Callable[[], object], *needles: str) -> RlxError:
    """The error `call` raises: of `error`'s type, naming every needle, with a fix."""
    with pytest.raises(error) as info:
        call()
    err = info.value
    for needle in needles:
        assert needle in err.message, (needle, err.message)
    assert err.hint, f"no hint on {err.message!r}"
    return err


# ---- config.json ------------------------------------------------------------------------------


def _rope4(layer_type: str, **change: Any) -> dict[str, Any]:
    return {**GEMMA4, "rope_parameters": {**GEMMA4_ROPE, layer_type: {**GEMMA4_ROPE[layer_type], **change}}}


# case -> (config, the field its error must name)
CONFIG_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "rope-theta-string": ({**GEMMA3, "rope_theta": "big"}, "rope_theta"),
    "rope-theta-string-nested": (_rope4(FULL, rope_theta="big"), "rope_parameters.full_attention.rope_theta"),
    "rope-theta-inf": ({**GEMMA3, "rope_theta": math.inf}, "rope_theta"),
    "rope-theta-nan": ({**GEMMA2, "rope_theta": math.nan}, "rope_theta"),
    "rope-theta-negative-nested": (_rope4(SLIDING, rope_theta=-1.0), "rope_parameters.sliding_attention.rope_theta"),
    "rope-theta-list": ({**GEMMA2, "rope_theta": [1e4]}, "rope_theta"),
    "eps-nan": ({**GEMMA2, "rms_norm_eps": math.nan}, "rms_norm_eps"),
    "eps-string": ({**GEMMA2, "rms_norm_eps": "tiny"}, "rms_norm_eps"),
    "hidden-negative": ({**GEMMA2, "hidden_size": -64}, "hidden_size"),
    "hidden-zero": ({**GEMMA2, "hidden_size": 0}, "hidden_size"),
    "hidden-fraction": ({**GEMMA2, "hidden_size": 64.5}, "hidden_size"),
    "hidden-inf": ({**GEMMA2, "hidden_size": math.inf}, "hidden_size"),
    "hidden-huge": ({**GEMMA2, "hidden_size": 10 ** 400}, "hidden_size"),
    "layers-bool": ({**GEMMA2, "num_hidden_layers": True}, "num_hidden_layers"),
    "layers-absurd": ({**GEMMA2, "num_hidden_layers": 10 ** 12}, "num_hidden_layers"),
    "intermediate-string": ({**GEMMA2, "intermediate_size": "128"}, "intermediate_size"),
    "kv-heads-null": ({**GEMMA2, "num_key_value_heads": None}, "num_key_value_heads"),
    "head-dim-negative": ({**GEMMA2, "head_dim": -16}, "head_dim"),
    "window-negative": ({**GEMMA2, "sliding_window": -1}, "sliding_window"),
    "max-positions-zero": ({**GEMMA2, "max_position_embeddings": 0}, "max_position_embeddings"),
    "softcap-string": ({**GEMMA2, "final_logit_softcapping": "30"}, "final_logit_softcapping"),
    "factor-string": ({**GEMMA3, "rope_parameters": {FULL: {"rope_type": "linear", "factor": "x", "rope_theta": 1e6}}},
                      "rope_parameters.full_attention.factor"),
    "factor-missing": ({**GEMMA3, "rope_scaling": {"rope_type": "linear"}}, "rope_parameters.full_attention.factor"),
    "partial-list": (_rope4(FULL, partial_rotary_factor=[1]), "rope_parameters.full_attention.partial_rotary_factor"),
    "partial-above-one": (_rope4(FULL, partial_rotary_factor=2.0),
                          "rope_parameters.full_attention.partial_rotary_factor"),
    "rope-type-int": (_rope4(SLIDING, rope_type=5), "rope_parameters.sliding_attention.rope_type"),
    "rope-parameters-list": ({**GEMMA3, "rope_parameters": [1, 2]}, "rope_parameters"),
    "rope-entry-list": ({**GEMMA3, "rope_parameters": {FULL: [1]}}, "rope_parameters.full_attention"),
    "rope-scaling-string": ({**GEMMA3, "rope_scaling": "linear"}, "rope_scaling"),
    "layer-types-ints": ({**GEMMA3, "layer_types": [1, 2, 3, 4, 5, 6]}, "layer_types"),
    "layer-types-string": ({**GEMMA3, "layer_types": SLIDING}, "layer_types"),
    "window-pattern-zero": ({**GEMMA3, "sliding_window_pattern": 0}, "sliding_window_pattern"),
    "eos-string": ({**GEMMA2, "eos_token_id": "eos"}, "eos_token_id"),
    "eos-strings": ({**GEMMA2, "eos_token_id": ["a", "b"]}, "eos_token_id"),
    "eos-mixed": ({**GEMMA2, "eos_token_id": [1, "b"]}, "eos_token_id"),
    "bos-float": ({**GEMMA2, "bos_token_id": 2.5}, "bos_token_id"),
    "model-type-list": ({**GEMMA2, "model_type": ["gemma2"]}, "model_type"),
    "text-config-string": ({"model_type": "gemma3", "text_config": "x"}, "text_config"),
    "text-config-list": ({"model_type": "gemma3", "text_config": [GEMMA3]}, "text_config"),
    "text-config-field": ({"model_type": "gemma3", "text_config": {**GEMMA3, "hidden_size": "x"}},
                          "text_config.hidden_size"),
    "per-layer-config-list": ({**GEMMA4, "per_layer_config": [1]}, "per_layer_config"),
    "per-layer-head-dim-string": ({**GEMMA4, "per_layer_config": {"5": {"head_dim": "x"}}},
                                  "per_layer_config.5.head_dim"),
    "k-eq-v-string": ({**GEMMA4, "attention_k_eq_v": "yes"}, "attention_k_eq_v"),
    "experts-negative": ({**GEMMA4, "enable_moe_block": True, "num_experts": -8}, "num_experts"),
    "ple-negative": ({**GEMMA4, "hidden_size_per_layer_input": -1}, "hidden_size_per_layer_input"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values_are_named(case: str) -> None:
    d, field = CONFIG_CASES[case]
    err = _raises(ConfigError, lambda: hf_config_from_dict(d, source="bad/config.json"), f"'{field}'",
                  "bad/config.json")
    assert f"'{field}'" in str(err.hint)  # the fix names the field too


def test_bad_list_entry_is_named() -> None:
    _raises(ConfigError, lambda: hf_config_from_dict({**GEMMA2, "eos_token_id": [1, "b"]}), "'eos_token_id'",
            "entry 1", "'b'")


@pytest.mark.parametrize("base", [GEMMA2, GEMMA3, GEMMA4, {"model_type": "gemma3", "text_config": GEMMA3}])
def test_valid_bases_read(base: dict[str, Any]) -> None:
    """The cases above each break one thing in a config that reads."""
    assert isinstance(hf_config_from_dict(base), GemmaConfig)


def test_explicit_nulls_keep_their_meaning() -> None:
    """null switches an optional feature off (softcaps, per-layer embeddings, Gemma 4 flags)."""
    g2 = hf_config_from_dict({**GEMMA2, "final_logit_softcapping": None, "attn_logit_softcapping": None})
    assert g2.final_softcap is None and g2.attn_softcap is None
    g4 = hf_config_from_dict({**GEMMA4, "hidden_size_per_layer_input": None, "attention_k_eq_v": None,
                              "enable_moe_block": None, "head_dim": None})
    assert g4.hidden_size_per_layer_input == 0 and not g4.attention_k_eq_v and not g4.enable_moe_block
    assert g4.head_dim == 64 // 4 and hf_config_from_dict({**GEMMA2, "head_dim": 0}).head_dim == 16


@pytest.mark.parametrize(("text", "needle"), [
    (b'{"model_type": "gemma2\xff\xfe"}', "not UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (b"42", "JSON object"),
    (b"", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_bad_config_files_name_the_file(text: bytes, needle: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(text)
    _raises(ConfigError, lambda: read_hf_config(tmp_path), needle, str(tmp_path / "config.json"))


@pytest.mark.parametrize("literal", ["1e999", "Infinity", "-Infinity", "NaN"])
def test_non_finite_json_numbers(literal: str, tmp_path: Path) -> None:
    """json.loads accepts these (1e999 parses as inf): a config must not."""
    text = json.dumps(GEMMA3)[:-1] + f', "rope_theta": {literal}}}'
    (tmp_path / "config.json").write_text(text)
    _raises(ConfigError, lambda: read_hf_config(tmp_path), "'rope_theta'")


def test_config_json_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()
    _raises(ConfigError, lambda: read_hf_config(tmp_path / "config.json"), "config.json")


# ---- GemmaConfig.from_dict (an artifact's manifest) ----------------------------------------------


def _manifest_config() -> dict[str, Any]:
    return json.loads(json.dumps(hf_config_from_dict(GEMMA4).to_dict()))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.__setitem__(key, value)


FROM_DICT_CASES: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "vocab-string": (_set("vocab_size", "x"), "vocab_size"),
    "layers-negative": (_set("num_layers", -2), "num_layers"),
    "eps-nan": (_set("rms_norm_eps", math.nan), "rms_norm_eps"),
    "tie-string": (_set("tie_word_embeddings", "no"), "tie_word_embeddings"),
    "softcap-list": (_set("final_softcap", [30.0]), "final_softcap"),
    "layer-types-int": (_set("layer_types", 5), "layer_types"),
    "layer-types-ints": (_set("layer_types", [0] * 6), "layer_types"),
    "eos-string": (_set("eos_token_ids", "ab"), "eos_token_ids"),
    "eos-strings": (_set("eos_token_ids", ["a"]), "eos_token_ids"),
    "rope-list": (_set("rope", [1]), "rope"),
    "rope-entry-list": (lambda d: d["rope"].__setitem__(FULL, [1]), f"rope.{FULL}"),
    "rope-theta-string": (lambda d: d["rope"][FULL].__setitem__("theta", "x"), f"rope.{FULL}"),
    "rope-partial-two": (lambda d: d["rope"][FULL].__setitem__("partial_rotary_factor", 2), "partial_rotary_factor"),
    "rope-unknown-key": (lambda d: d["rope"][FULL].__setitem__("beta", 1), "beta"),
    "rope-no-theta": (lambda d: d["rope"][FULL].pop("theta"), "theta"),
    "missing-key": (lambda d: d.pop("hidden_size"), "hidden_size"),
    "unknown-key": (_set("surprise", 1), "surprise"),
}


@pytest.mark.parametrize("case", sorted(FROM_DICT_CASES))
def test_from_dict_names_the_key(case: str) -> None:
    change, needle = FROM_DICT_CASES[case]
    d = _manifest_config()
    change(d)
    _raises(ConfigError, lambda: GemmaConfig.from_dict(d, source="art/manifest.json"), needle, "art/manifest.json")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GemmaConfig) if not f.name.startswith("_")])
def test_every_gemma_config_field_is_type_checked(field: str) -> None:
    """No field reaches the compiler unchecked: an object where a value belongs names the field."""
    d = {**_manifest_config(), field: {"not": "a value"}}
    _raises(ConfigError, lambda: GemmaConfig.from_dict(d, source="art/manifest.json"), field)


def test_from_dict_not_an_object() -> None:
    _raises(ConfigError, lambda: GemmaConfig.from_dict([1], source="m.json"), "m.json")  # type: ignore[arg-type]


# ---- safetensors headers ----------------------------------------------------------------------

EMBED, NORM = "model.embed_tokens.weight", "model.norm.weight"


def _safetensors(path: Path) -> Path:
    save_file({EMBED: np.arange(32, dtype=np.float32).reshape(8, 4), NORM: np.ones(4, np.float16)}, str(path))
    return path


def _with_header(path: Path, change: Callable[[dict[str, Any]], object], *, length: int | None = None) -> Path:
    """Rewrite the JSON header (`change` edits it, or returns a replacement); `length` lies about its size."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    result = change(header)
    text = json.dumps(header if result is None else result).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + blob[8 + n:])
    return path


def _entry(name: str, **change: Any) -> Callable[[dict[str, Any]], object]:
    def apply(h: dict[str, Any]) -> None:
        h[name].update(change)
        for key in [k for k, v in change.items() if v is None]:
            del h[name][key]
    return apply


HEADER_CASES: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "no-dtype": (_entry(EMBED, dtype=None), "no dtype"),
    "unknown-dtype": (_entry(EMBED, dtype="Q9"), "unknown dtype 'Q9'"),
    "dtype-int": (_entry(EMBED, dtype=7), "unknown dtype 7"),
    "offsets-strings": (_entry(EMBED, data_offsets=["a", "b"]), "data_offsets"),
    "offsets-negative": (_entry(EMBED, data_offsets=[-8, 120]), "data_offsets"),
    "offsets-float": (_entry(EMBED, data_offsets=[0.0, 128.0]), "data_offsets"),
    "offsets-three": (_entry(EMBED, data_offsets=[0, 64, 128]), "data_offsets"),
    "offsets-missing": (_entry(EMBED, data_offsets=None), "data_offsets"),
    "offsets-reversed": (_entry(EMBED, data_offsets=[128, 0]), "reversed"),
    "offsets-past-end": (_entry(EMBED, data_offsets=[0, 1 << 40]), "past the end"),
    "offsets-overlap": (_entry(NORM, data_offsets=[120, 128]), "overlap"),
    "shape-string": (_entry(EMBED, shape="8x4"), "shape"),
    "shape-negative": (_entry(EMBED, shape=[-8, -4]), "shape"),
    "shape-bools": (_entry(EMBED, shape=[True, 4]), "shape"),
    "shape-missing": (_entry(EMBED, shape=None), "shape"),
    "bytes-mismatch": (_entry(EMBED, shape=[8, 3]), "takes 96 bytes"),
    "dtype-mismatch": (_entry(EMBED, dtype="F64"), "takes 256 bytes"),
    "entry-not-object": (lambda h: h.__setitem__(EMBED, [1, 2]), "not an object"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_bad_safetensors_entries_name_the_tensor(case: str, tmp_path: Path) -> None:
    change, needle = HEADER_CASES[case]
    path = _with_header(_safetensors(tmp_path / "model.safetensors"), change)
    tensor = NORM if case == "offsets-overlap" else EMBED
    with open(path, "rb") as f, pytest.raises(ValueError) as info:
        read_header(f)
    assert tensor in str(info.value) and needle in str(info.value)
    _raises(WeightError, lambda: WeightStore.open(path, hf_config_from_dict(GEMMA2)), str(path), tensor, needle)


FILE_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "header-length-huge": (lambda p: _with_header(p, lambda h: None, length=1 << 40), "header length"),
    "header-length-past-end": (lambda p: _with_header(p, lambda h: None, length=1 << 20), "truncated"),
    "header-array": (lambda p: _with_header(p, lambda h: [1, 2]), "not an object"),
    "header-number": (lambda p: _with_header(p, lambda h: 3), "not an object"),
    "header-not-utf8": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b'"\xff\xfe"' + b"\0" * 8), "not UTF-8"),
    "header-not-json": (lambda p: p.write_bytes(struct.pack("<Q", 6) + b"{nope}"), "not valid JSON"),
    "short-file": (lambda p: p.write_bytes(b"\1\0"), "truncated"),
    "empty-file": (lambda p: p.write_bytes(b""), "truncated"),
    "truncated-data": (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_damaged_safetensors_files_name_the_file(case: str, tmp_path: Path) -> None:
    damage, needle = FILE_CASES[case]
    path = _safetensors(tmp_path / "model.safetensors")
    damage(path)
    with pytest.raises(ValueError, match=needle):
        read_header(io.BytesIO(path.read_bytes()))
    _raises(WeightError, lambda: WeightStore.open(path, hf_config_from_dict(GEMMA2)), str(path), needle)


def test_valid_safetensors_header_reads(tmp_path: Path) -> None:
    """Zero-size tensors, metadata, and the exact entries survive the checks."""
    path = tmp_path / "model.safetensors"
    save_file({EMBED: np.zeros((8, 4), np.float32), "empty": np.zeros((0, 4), np.float32),
               "scalar": np.array(3, np.float32)}, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        header, base = read_header(f)
    assert set(header) == {EMBED, "empty", "scalar"} and header["scalar"]["shape"] == []
    assert base == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_bad_shard_index(tmp_path: Path) -> None:
    _safetensors(tmp_path / "a.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for text in (b'{"weight_map": ["a.safetensors"]}', b'{"weight_map": {"x": 1}}', b"\xff", b"[]"):
        index.write_bytes(text)
        _raises(WeightError, lambda: WeightStore.open(tmp_path, hf_config_from_dict(GEMMA2)), str(index))


# ---- GGUF -------------------------------------------------------------------------------------

_EMBEDDING = {"token_embd.weight": np.zeros((32, 64), np.float32)}


def _gguf(path: Path, values: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None, *,
          drop: tuple[str, ...] = (), tensors: dict[str, np.ndarray] | None = None, **kwargs: Any) -> Path:
    """The minimal Gemma 3 GGUF with keys dropped or replaced (full key -> (value, type))."""
    meta = {**{k: v for k, v in MINIMAL_GEMMA3.items() if k not in drop}, **(values or {})}
    return write_gguf(path, meta, _EMBEDDING if tensors is None else tensors, **kwargs)


def test_minimal_gguf_opens(tmp_path: Path) -> None:
    ckpt = open_checkpoint(_gguf(tmp_path / "m.gguf"))
    assert ckpt.config.num_layers == 2 and ckpt.config.vocab_size == 32 and "embed_tokens.weight" in ckpt.weights


GGUF_CONFIG_CASES: dict[str, tuple[dict[str, tuple[Any, gguf.GGUFValueType]], str]] = {
    "block-count-string": ({"gemma3.block_count": ("four", T.STRING)}, "'gemma3.block_count'"),
    "block-count-zero": ({"gemma3.block_count": (0, T.UINT32)}, "'gemma3.block_count'"),
    "block-count-absurd": ({"gemma3.block_count": (2 ** 40, T.UINT64)}, "'gemma3.block_count'"),
    "block-count-float": ({"gemma3.block_count": (2.0, T.FLOAT32)}, None),  # integral: still 2 layers
    "freq-base-string": ({"gemma3.rope.freq_base": ("big", T.STRING)}, "'gemma3.rope.freq_base'"),
    "freq-base-array": ({"gemma3.rope.freq_base": ([1e6, 1e4], T.ARRAY)}, "'gemma3.rope.freq_base'"),
    "freq-base-inf": ({"gemma3.rope.freq_base": (math.inf, T.FLOAT32)}, "'gemma3.rope.freq_base'"),
    "freq-base-beyond-f32": ({"gemma3.rope.freq_base": (1e300, T.FLOAT64)}, "'gemma3.rope.freq_base'"),
    "eps-nan": ({"gemma3.attention.layer_norm_rms_epsilon": (math.nan, T.FLOAT32)}, "layer_norm_rms_epsilon"),
    "heads-zero": ({"gemma3.attention.head_count": (0, T.UINT32)}, "'gemma3.attention.head_count'"),
    "heads-negative": ({"gemma3.attention.head_count": (-4, T.INT32)}, "'gemma3.attention.head_count'"),
    "kv-heads-wrong-length": ({"gemma3.attention.head_count_kv": ([2, 2, 2], T.ARRAY)}, "3 entries for 2 layers"),
    "kv-heads-strings": ({"gemma3.attention.head_count_kv": (["2", "2"], T.ARRAY)}, "head_count_kv"),
    "window-string": ({"gemma3.attention.sliding_window": ("8", T.STRING)}, "sliding_window"),
    "pattern-ints": ({"gemma3.attention.sliding_window_pattern": ([1, 0], T.ARRAY)}, "sliding_window_pattern"),
    "tokens-ints": ({"tokenizer.ggml.tokens": ([1, 2], T.ARRAY)}, "'tokenizer.ggml.tokens'"),
    "tokens-string": ({"tokenizer.ggml.tokens": ("abc", T.STRING)}, "'tokenizer.ggml.tokens'"),
    "eos-string": ({"tokenizer.ggml.eos_token_id": ("1", T.STRING)}, "'tokenizer.ggml.eos_token_id'"),
    "bos-negative": ({"tokenizer.ggml.bos_token_id": (-2, T.INT32)}, "'tokenizer.ggml.bos_token_id'"),
    "scaling-type-int": ({"gemma3.rope.scaling.type": (1, T.UINT32)}, "'gemma3.rope.scaling.type'"),
    "context-bool": ({"gemma3.context_length": (True, T.BOOL)}, "'gemma3.context_length'"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CONFIG_CASES))
def test_bad_gguf_metadata_names_the_key(case: str, tmp_path: Path) -> None:
    values, needle = GGUF_CONFIG_CASES[case]
    path = _gguf(tmp_path / "m.gguf", values)
    if needle is None:
        assert open_checkpoint(path).config.num_layers == 2
    else:
        _raises(ConfigError, lambda: open_checkpoint(path), needle, str(path))


def test_gguf_architecture_not_a_string(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {**MINIMAL_GEMMA3, "general.architecture": (3, T.UINT32)}, _EMBEDDING)
    _raises(ConfigError, lambda: open_checkpoint(path), "not a Gemma GGUF")


def test_gguf_without_embedding(tmp_path: Path) -> None:
    with_tokens = _gguf(tmp_path / "a.gguf", tensors={"output_norm.weight": np.ones(64, np.float32)})
    _raises(WeightError, lambda: open_checkpoint(with_tokens), "token_embd.weight", str(with_tokens))
    # the vocabulary size is the embedding's rows where no token list says it
    no_tokens = _gguf(tmp_path / "b.gguf", drop=("tokenizer.ggml.tokens",), tensors={})
    _raises(WeightError, lambda: open_checkpoint(no_tokens), "token_embd.weight", str(no_tokens))
    flat = _gguf(tmp_path / "c.gguf", drop=("tokenizer.ggml.tokens",), tensors={"token_embd.weight": np.zeros(64)})
    _raises(WeightError, lambda: open_checkpoint(flat), "token_embd.weight", "1-D")


def _patch_tensor_info(path: Path, name: str, *, type_id: int | None = None, ne0: int | None = None) -> Path:
    """Overwrite one tensor table entry's ggml type id or first dimension (ne[0]) in place."""
    blob = bytearray(path.read_bytes())
    at = blob.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", blob, at)
    if ne0 is not None:
        struct.pack_into("<Q", blob, at + 4, ne0)
    if type_id is not None:
        struct.pack_into("<I", blob, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(blob))
    return path


def test_gguf_unknown_tensor_type(tmp_path: Path) -> None:
    path = _patch_tensor_info(_gguf(tmp_path / "m.gguf"), "token_embd.weight", type_id=999)
    _raises(WeightError, lambda: open_checkpoint(path), "token_embd.weight", "unknown ggml type id 999", str(path))


def test_gguf_rows_not_whole_blocks(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf", quantize={"token_embd.weight": gguf.GGMLQuantizationType.Q8_0})
    assert open_checkpoint(path).weights.dtype("embed_tokens.weight") == "Q8_0"
    _patch_tensor_info(path, "token_embd.weight", ne0=48)  # Q8_0 blocks hold 32 values
    _raises(WeightError, lambda: open_checkpoint(path), "token_embd.weight", "Q8_0 blocks of 32")


def test_gguf_bad_alignment_and_nesting(tmp_path: Path) -> None:
    zero = _gguf(tmp_path / "a.gguf", {"general.alignment": (0, T.UINT32)})
    _raises(WeightError, lambda: open_checkpoint(zero), "general.alignment")
    nested: list[Any] = [1]
    for _ in range(20):
        nested = [nested]
    deep = _gguf(tmp_path / "b.gguf", {"x.nested": (nested, T.ARRAY)})
    _raises(WeightError, lambda: open_checkpoint(deep), str(deep), "nested")
