"""`config.json` -> `GemmaConfig`, with transformers' own defaults (`models/gemma*/configuration_gemma*.py`,
v5.24): a config.json may omit any field that has one, and a wrapper (Gemma 3 / 4 multimodal)
nests the LM under `text_config`. Every bad value is a `ConfigError` naming the field and file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlx.errors import ConfigError
from rlx.frontends.config import (
    FULL,
    LAYER_TYPES,
    ROPE_KINDS,
    SLIDING,
    GemmaConfig,
    RopeSpec,
    ValueKind,
    check_list,
    check_value,
    describe,
)

_LEGACY_LAYER_TYPES = {"attention": FULL}  # transformers' `remap_legacy_layer_types`

_MISSING: Any = object()


class _Fields:
    """Typed access to one config object (`prefix` places it in the file: "text_config."), with
    errors that name the file and the field."""

    def __init__(self, d: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.d, self.source, self.prefix = d, source, prefix

    def _where(self, key: str) -> str:
        return f"field '{self.prefix}{key}' in {self.source}"

    def sub(self, key: str) -> _Fields:
        """The object under `key` (which must be one), addressed as `prefix.key.`."""
        return _Fields(self.get(key, "object"), self.source, f"{self.prefix}{key}.")

    def get(self, key: str, kind: ValueKind, default: Any = _MISSING) -> Any:
        """The value as `kind`. A missing field takes `default`; an explicit null is None where the
        default is None (an optional field), else an error (the field needs a value)."""
        value = self.d.get(key)
        if value is None:
            if key not in self.d and default is not _MISSING:
                return default
            if key in self.d and default is None:
                return None
            state = "null" if key in self.d else "missing"
            raise ConfigError(f"{state} {self._where(key)}",
                              hint=f"set '{self.prefix}{key}' to {describe(kind)} in the model config")
        return check_value(value, kind, self._where(key),
                           hint=f"set '{self.prefix}{key}' to {describe(kind)} in the model config")

    def get_list(self, key: str, kind: ValueKind) -> list[Any] | None:
        """A list of `kind` values, or None where the field is missing or null."""
        value = self.d.get(key)
        hint = f"set '{self.prefix}{key}' to a list of values, each {describe(kind)}, in the model config"
        return None if value is None else check_list(value, kind, self._where(key), hint=hint)

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (`eos_token_id`); null means none."""
        value = self.d.get(key)
        if isinstance(value, (list, tuple)):
            return tuple(self.get_list(key, "int") or ())
        return () if value is None else (self.get(key, "int"),)


@dataclass(frozen=True)
class _Family:
    """One transformers config class: its generation and the defaults it gives omitted fields."""

    generation: int
    activation_key: str
    defaults: Mapping[str, Any]


_COMMON_DEFAULTS = {
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
}
_FAMILIES: dict[str, _Family] = {
    "gemma": _Family(1, "hidden_act", {
        **_COMMON_DEFAULTS, "vocab_size": 256000, "num_key_value_heads": 16,
        "max_position_embeddings": 8192,
    }),
    "gemma2": _Family(2, "hidden_activation", {
        **_COMMON_DEFAULTS, "vocab_size": 256000, "num_key_value_heads": 4, "max_position_embeddings": 8192,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    }),
    "gemma3_text": _Family(3, "hidden_activation", {
        **_COMMON_DEFAULTS, "vocab_size": 262_208, "num_key_value_heads": 4, "max_position_embeddings": 131_072,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }),
    "gemma4_text": _Family(4, "hidden_activation", {
        **_COMMON_DEFAULTS, "vocab_size": 262_144, "num_key_value_heads": 4, "max_position_embeddings": 131_072,
        "sliding_window": 512, "final_logit_softcapping": None, "hidden_size_per_layer_input": 256,
    }),
}
# multimodal wrappers: the LM config sits under text_config
_WRAPPERS = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
SUPPORTED_MODEL_TYPES = tuple(sorted([*_FAMILIES, *_WRAPPERS]))
# fields without a meaningful default: a config without them describes no particular model
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def default_layer_types(gen: int, n: int, period: int) -> list[str]:
    """transformers' default pattern: Gemma 1 all full, 2 alternating, 3/4 every `period`-th full."""
    if gen == 1:
        return [FULL] * n
    if gen == 2:
        period = 2
    return [SLIDING if (i + 1) % period else FULL for i in range(n)]


def _layer_types(f: _Fields, gen: int, n: int) -> list[str]:
    given = f.get_list("layer_types", "str")
    if given is None:
        # only Gemma3TextConfig reads the legacy sliding_window_pattern; Gemma 4 hard-codes 6
        types = default_layer_types(gen, n, f.get("sliding_window_pattern", "size", 6) if gen == 3 else 6)
    elif gen == 1:
        raise ConfigError(f"{f._where('layer_types')}: Gemma 1 has only full attention", hint="remove it")
    else:
        types = [_LEGACY_LAYER_TYPES.get(t, t) for t in given]
    if gen == 4 and types:
        types[-1] = FULL  # Gemma4TextConfig forces the last layer to full attention
    return types


def _rope_spec(p: _Fields) -> RopeSpec:
    """One layer type's merged RoPE parameters (`p` is addressed as rope_parameters.<type>.)."""
    where = f"field '{p.prefix[:-1]}' in {p.source}"
    kind = p.get("rope_type", "str") if "rope_type" in p.d else p.get("type", "str", "default")
    if kind not in ROPE_KINDS:
        raise ConfigError(
            f"{where}: rope_type {kind!r} is not supported",
            hint=f"Gemma uses {', '.join(ROPE_KINDS)}; other scalings (yarn, dynamic...) are not implemented",
        )
    partial = p.get("partial_rotary_factor", "fraction" if kind == "proportional" else "float", 1.0) or 1.0
    if kind == "linear" and partial != 1.0:
        raise ConfigError(f"{where}: partial rotary with linear scaling is not supported",
                          hint="remove partial_rotary_factor")
    return RopeSpec(
        theta=p.get("rope_theta", "positive"),
        kind=kind,
        # linear scaling needs its factor; default RoPE ignores one
        factor=1.0 if kind == "default" else p.get("factor", "positive", _MISSING if kind == "linear" else 1.0),
        partial_rotary_factor=partial if kind == "proportional" else 1.0,
    )


def _split_rope(f: _Fields, key: str, types: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A `rope_parameters`-style field as {layer_type: params}; a flat object applies to every type."""
    if f.get(key, "object", None) is None:
        return {}
    rp = f.sub(key)
    if any(k in LAYER_TYPES for k in rp.d):
        return {t: rp.get(t, "object") for t in LAYER_TYPES if rp.d.get(t) is not None}
    return {t: dict(rp.d) for t in types}


def _rope_gen12(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # PreTrainedConfig.convert_rope_params_to_dict: legacy rope_scaling wins, theta defaults to 1e4
    rp = _split_rope(f, "rope_scaling" if f.get("rope_scaling", "object", None) else "rope_parameters", set(types))
    theta = f.get("rope_theta", "positive", 10_000.0)
    for t in set(types):
        rp.setdefault(t, {}).setdefault("rope_theta", theta)
    return rp


def _rope_gen3(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # Gemma3TextConfig.convert_rope_params_to_dict
    rp = _split_rope(f, "rope_parameters", LAYER_TYPES)
    rp.setdefault(FULL, {"rope_type": "default"})
    rp.setdefault(SLIDING, {"rope_type": "default"})
    rp[FULL].update(f.get("rope_scaling", "object", None) or {})
    rp[FULL].setdefault("rope_theta", f.get("rope_theta", "positive", 1_000_000.0))
    rp[SLIDING].setdefault("rope_theta", f.get("rope_local_base_freq", "positive", 10_000.0))
    return rp


_GEMMA4_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _rope_gen4(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # Gemma4TextConfig: no legacy forms; a missing type falls back to the class default
    rp = _split_rope(f, "rope_parameters", LAYER_TYPES)
    for t, default in _GEMMA4_ROPE.items():
        rp.setdefault(t, dict(default)).setdefault("rope_theta", default["rope_theta"])
    return rp


_ROPE_READERS: dict[int, Callable[[_Fields, list[str]], dict[str, dict[str, Any]]]] = {
    1: _rope_gen12, 2: _rope_gen12, 3: _rope_gen3, 4: _rope_gen4,
}


def _gemma4_fields(f: _Fields, types: list[str], head_dim: int) -> dict[str, Any]:
    """Gemma 4 extras; full layers' head_dim / kv heads come from `per_layer_config` when saved."""
    k_eq_v = bool(f.get("attention_k_eq_v", "bool", None))  # null: off, as transformers reads it
    global_head_dim = f.get("global_head_dim", "size", 512)
    global_kv = f.get("num_global_key_value_heads", "size", None) if k_eq_v else None
    if f.get("per_layer_config", "object", None) is not None:
        overrides = f.sub("per_layer_config")
        full = {str(i) for i, t in enumerate(types) if t == FULL}
        seen: set[tuple[tuple[str, int], ...]] = set()
        for key, value in overrides.d.items():
            if str(key) not in full or not isinstance(value, Mapping) or \
                    set(value) - {"head_dim", "num_key_value_heads"}:
                raise ConfigError(
                    f"{f._where('per_layer_config')}: only full-attention head_dim / num_key_value_heads "
                    f"overrides are supported, got layer {key}: {value}",
                    hint="rlx models Gemma 4's global layers only",
                )
            layer = overrides.sub(key)
            seen.add(tuple(sorted((name, layer.get(name, "size")) for name in value)))
        if len(seen) > 1:
            raise ConfigError(f"{f._where('per_layer_config')}: full layers differ ({seen})",
                              hint="give every full-attention layer the same head_dim / num_key_value_heads")
        values = dict(seen.pop()) if seen else {}
        global_head_dim = values.get("head_dim", head_dim)
        global_kv = values.get("num_key_value_heads")
        if global_kv is not None and not k_eq_v:
            raise ConfigError(
                f"{f._where('per_layer_config')} changes full layers' KV heads without attention_k_eq_v",
                hint="rlx supports separate global KV heads only with attention_k_eq_v",
            )
    moe = bool(f.get("enable_moe_block", "bool", None))
    ple = f.get("hidden_size_per_layer_input", "count", None) or 0  # null: per-layer embeddings off
    return {
        "global_head_dim": global_head_dim,
        "num_global_kv_heads": global_kv,
        "attention_k_eq_v": k_eq_v,
        "enable_moe_block": moe,
        "num_experts": f.get("num_experts", "size", None),
        "top_k_experts": f.get("top_k_experts", "size", None),
        "moe_intermediate_size": f.get("moe_intermediate_size", "size", None),
        "hidden_size_per_layer_input": ple,
        # Gemma4TextConfig's default; 0 when PLE is off, where the GGUF reader has no table to size
        "vocab_size_per_layer_input": f.get("vocab_size_per_layer_input", "size", 262_144) if ple else 0,
        "num_kv_shared_layers": f.get("num_kv_shared_layers", "count", 0),
        "use_double_wide_mlp": bool(f.get("use_double_wide_mlp", "bool", None)),
    }


def _special(text: _Fields, outer: _Fields, key: str, default: Any, *, many: bool = False) -> Any:
    """Explicit text_config value, else explicit wrapper value, else the class default."""
    for f in (text, outer):
        if key in f.d:
            return f.token_ids(key) if many else f.get(key, "int", None)
    return default


def hf_config_from_dict(d: Mapping[str, Any], *, source: str = "config.json") -> GemmaConfig:
    """A config.json's contents (`source` names it in errors)."""
    outer = _Fields(check_value(d, "object", source, hint="re-download the model's config.json"), source)
    model_type = outer.get("model_type", "str", None)
    text, family_name = outer, model_type
    if model_type in _WRAPPERS:
        family_name = _WRAPPERS[model_type]
        text = outer.sub("text_config") if outer.d.get("text_config") is not None else \
            _Fields({}, source, "text_config.")
    family = _FAMILIES.get(family_name)
    if family is None:
        what = f"model_type {model_type!r} is not a supported Gemma model" if model_type else "has no model_type"
        raise ConfigError(f"{source}: {what}", hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    gen = family.generation
    f = _Fields({**family.defaults, **text.d}, source, text.prefix)
    for key in _REQUIRED:
        f.get(key, "size")  # raises naming the field and file
    bidirectional = text.d.get("use_bidirectional_attention")
    if bidirectional is True or bidirectional == "all":
        raise ConfigError(
            f"{source}: use_bidirectional_attention={bidirectional!r} (an encoder such as EmbeddingGemma)",
            hint="rlx compiles causal decoders only",
        )
    n = f.get("num_hidden_layers", "layers")
    heads = f.get("num_attention_heads", "size")
    types = _layer_types(f, gen, n)
    activation = f.get(family.activation_key, "str", "gelu_pytorch_tanh")
    if gen == 1 and activation == "gelu":
        activation = "gelu_pytorch_tanh"  # GemmaConfig.__post_init__: legacy name of the tanh form
    rope = {t: _rope_spec(_Fields(p, source, f"{text.prefix}rope_parameters.{t}."))
            for t, p in _ROPE_READERS[gen](f, types).items()}
    head_dim = f.get("head_dim", "count", None) or f.get("hidden_size", "size") // heads  # 0 / null: derive
    extras = _gemma4_fields(f, types, head_dim) if gen == 4 else {}
    # transformers ties a wrapper's LM head by the wrapper's own flag, not text_config's
    tie = outer.get("tie_word_embeddings", "bool", True) if text is not outer else f.get("tie_word_embeddings", "bool")
    return GemmaConfig(
        generation=gen,
        model_type=str(model_type),
        vocab_size=f.get("vocab_size", "size"),
        hidden_size=f.get("hidden_size", "size"),
        intermediate_size=f.get("intermediate_size", "size"),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", "size", heads),
        head_dim=head_dim,
        rms_norm_eps=f.get("rms_norm_eps", "float"),
        query_pre_attn_scalar=f.get("query_pre_attn_scalar", "positive", None) if gen in (2, 3) else None,
        attn_softcap=f.get("attn_logit_softcapping", "positive", None) if gen in (2, 3) else None,
        final_softcap=f.get("final_logit_softcapping", "positive", None) if gen > 1 else None,
        sliding_window=f.get("sliding_window", "size", None) if SLIDING in types else None,
        layer_types=tuple(types),
        rope=rope,
        tie_word_embeddings=tie,
        max_position_embeddings=f.get("max_position_embeddings", "size"),
        bos_token_id=_special(text, outer, "bos_token_id", family.defaults["bos_token_id"]),
        eos_token_ids=_special(text, outer, "eos_token_id", (family.defaults["eos_token_id"],), many=True),
        pad_token_id=_special(text, outer, "pad_token_id", family.defaults["pad_token_id"]),
        hidden_activation=activation,
        **extras,
        _source=source,
    )


def read_hf_config(path: str | Path) -> GemmaConfig:
    """`path` is a config.json or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    hint = "fix the file or re-download it"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"no config file at {path}", hint="point at a Hugging Face model directory") from err
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", hint="check the path and its permissions") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})", hint=hint) from err
    try:
        d = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
                          hint=hint) from err
    except (ValueError, RecursionError) as err:  # an integer of > 4300 digits, nesting deeper than Python's stack
        raise ConfigError(f"{path} is not valid JSON ({err})", hint=hint) from err
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(d).__name__}", hint=hint)
    return hf_config_from_dict(d, source=str(path))


__all__ = ["SUPPORTED_MODEL_TYPES", "default_layer_types", "hf_config_from_dict", "read_hf_config"]
