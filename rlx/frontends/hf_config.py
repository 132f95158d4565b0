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
from rlx.frontends.config import FULL, LAYER_TYPES, ROPE_KINDS, SLIDING, GemmaConfig, RopeSpec

_LEGACY_LAYER_TYPES = {"attention": FULL}  # transformers' `remap_legacy_layer_types`

_MISSING: Any = object()


class _Fields:
    """Typed access to one config dict, with errors that name the file and the field."""

    def __init__(self, d: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.d, self.source, self.prefix = d, source, prefix

    def _where(self, key: str) -> str:
        return f"field '{self.prefix}{key}' in {self.source}"

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value; an explicit null stays None unless the field is required (no default)."""
        value = self.d.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            state = "null" if key in self.d else "missing"
            raise ConfigError(f"{state} {self._where(key)}", hint=f"set '{self.prefix}{key}' in the model config")
        return None if key in self.d else default

    def _typed(self, key: str, default: Any, kinds: tuple[type, ...], convert: Callable[[Any], Any]) -> Any:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "a boolean" if bool in kinds else "a string" if str in kinds else "a number"
            raise ConfigError(f"{self._where(key)} must be {names}, got {value!r}",
                              hint=f"set '{self.prefix}{key}' to {names} in the model config")
        return convert(value)

    def int(self, key: str, default: Any = _MISSING) -> Any:
        value = self._typed(key, default, (int, float), lambda v: v)
        if value is not None and float(value) != int(value):
            raise ConfigError(f"{self._where(key)} must be an integer, got {value!r}",
                              hint=f"set '{self.prefix}{key}' to an integer in the model config")
        return None if value is None else int(value)

    def float(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, (int, float), float)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, (bool,), bool)

    def str(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, (str,), str)


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


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def default_layer_types(gen: int, n: int, period: int) -> list[str]:
    """transformers' default pattern: Gemma 1 all full, 2 alternating, 3/4 every `period`-th full."""
    if gen == 1:
        return [FULL] * n
    if gen == 2:
        period = 2
    return [SLIDING if (i + 1) % period else FULL for i in range(n)]


def _layer_types(f: _Fields, gen: int, n: int) -> list[str]:
    given = f.raw("layer_types", None)
    if given is None:
        # only Gemma3TextConfig reads the legacy sliding_window_pattern; Gemma 4 hard-codes 6
        period = f.int("sliding_window_pattern", 6) if gen == 3 else 6
        if period <= 0:
            raise ConfigError(f"{f._where('sliding_window_pattern')} must be positive", hint="fix it")
        types = default_layer_types(gen, n, period)
    elif gen == 1:
        raise ConfigError(f"{f._where('layer_types')}: Gemma 1 has only full attention", hint="remove it")
    elif not isinstance(given, list) or not all(isinstance(t, str) for t in given):
        raise ConfigError(f"{f._where('layer_types')} must be a list of strings", hint="fix layer_types")
    else:
        types = [_LEGACY_LAYER_TYPES.get(t, t) for t in given]
    if gen == 4 and types:
        types[-1] = FULL  # Gemma4TextConfig forces the last layer to full attention
    return types


def _rope_spec(params: Mapping[str, Any], where: str) -> RopeSpec:
    """`where` names the field and file, e.g. "field 'rope_parameters.full_attention' in config.json"."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where} must be an object", hint="fix rope_parameters")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ConfigError(
            f"{where}: rope_type {kind!r} is not supported",
            hint=f"Gemma uses {', '.join(ROPE_KINDS)}; other scalings (yarn, dynamic...) are not implemented",
        )
    if params.get("rope_theta") is None:
        raise ConfigError(f"{where}: rope_theta is missing", hint="add rope_theta")
    if kind == "linear" and params.get("factor") is None:
        raise ConfigError(f"{where}: factor is missing for linear RoPE scaling", hint="add factor")
    partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    if kind == "linear" and partial != 1.0:
        raise ConfigError(f"{where}: partial rotary with linear scaling is not supported",
                          hint="remove partial_rotary_factor")
    return RopeSpec(
        theta=float(params["rope_theta"]),
        kind=kind,
        factor=float(params.get("factor", 1.0)) if kind != "default" else 1.0,
        partial_rotary_factor=partial if kind == "proportional" else 1.0,
    )


def _split_rope(rp: Any, types: Iterable[str], where: str) -> dict[str, dict[str, Any]]:
    """A `rope_parameters` value as {layer_type: params}; a flat dict applies to every type."""
    if rp is None:
        return {}
    if not isinstance(rp, Mapping):
        raise ConfigError(f"{where} must be an object", hint="fix rope_parameters")
    if any(k in LAYER_TYPES for k in rp):
        return {k: dict(v) for k, v in rp.items() if k in LAYER_TYPES and v is not None}
    return {t: dict(rp) for t in types}


def _rope_gen12(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # PreTrainedConfig.convert_rope_params_to_dict: legacy rope_scaling wins, theta defaults to 1e4
    rp = _split_rope(f.raw("rope_scaling", None) or f.raw("rope_parameters", None), set(types),
                     f._where("rope_parameters"))
    theta = f.float("rope_theta", 10_000.0)
    for t in set(types):
        rp.setdefault(t, {}).setdefault("rope_theta", theta)
    return rp


def _rope_gen3(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # Gemma3TextConfig.convert_rope_params_to_dict
    rp = _split_rope(f.raw("rope_parameters", None), LAYER_TYPES, f._where("rope_parameters"))
    rp.setdefault(FULL, {"rope_type": "default"})
    rp.setdefault(SLIDING, {"rope_type": "default"})
    scaling = f.raw("rope_scaling", None)
    if scaling is not None:
        rp[FULL].update(scaling)
    rp[FULL].setdefault("rope_theta", f.float("rope_theta", 1_000_000.0))
    rp[SLIDING].setdefault("rope_theta", f.float("rope_local_base_freq", 10_000.0))
    return rp


_GEMMA4_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _rope_gen4(f: _Fields, types: list[str]) -> dict[str, dict[str, Any]]:
    # Gemma4TextConfig: no legacy forms; a missing type falls back to the class default
    rp = _split_rope(f.raw("rope_parameters", None), LAYER_TYPES, f._where("rope_parameters"))
    for t, default in _GEMMA4_ROPE.items():
        rp.setdefault(t, dict(default)).setdefault("rope_theta", default["rope_theta"])
    return rp


_ROPE_READERS: dict[int, Callable[[_Fields, list[str]], dict[str, dict[str, Any]]]] = {
    1: _rope_gen12, 2: _rope_gen12, 3: _rope_gen3, 4: _rope_gen4,
}


def _gemma4_fields(f: _Fields, types: list[str]) -> dict[str, Any]:
    """Gemma 4 extras; full layers' head_dim / kv heads come from `per_layer_config` when saved."""
    k_eq_v = f.bool("attention_k_eq_v", False)
    global_head_dim = f.int("global_head_dim", 512)
    global_kv = f.int("num_global_key_value_heads", None) if k_eq_v else None
    overrides = f.raw("per_layer_config", None)
    if overrides is not None:
        full = {i for i, t in enumerate(types) if t == FULL}
        seen: set[tuple[tuple[str, Any], ...]] = set()
        for key, value in dict(overrides).items():
            if int(key) not in full or not isinstance(value, Mapping) or set(value) - {"head_dim",
                                                                                        "num_key_value_heads"}:
                raise ConfigError(
                    f"{f._where('per_layer_config')}: only full-attention head_dim / num_key_value_heads "
                    f"overrides are supported, got layer {key}: {value}",
                    hint="rlx models Gemma 4's global layers only",
                )
            seen.add(tuple(sorted(value.items())))
        if len(seen) > 1:
            raise ConfigError(f"{f._where('per_layer_config')}: full layers differ ({seen})", hint="fix it")
        values = dict(seen.pop()) if seen else {}
        global_head_dim = int(values.get("head_dim", f.int("head_dim", 256)))
        global_kv = values.get("num_key_value_heads")
        if global_kv is not None and not k_eq_v:
            raise ConfigError(
                f"{f._where('per_layer_config')} changes full layers' KV heads without attention_k_eq_v",
                hint="rlx supports separate global KV heads only with attention_k_eq_v",
            )
    moe = f.bool("enable_moe_block", False)
    ple = f.int("hidden_size_per_layer_input", 256) or 0
    return {
        "global_head_dim": global_head_dim,
        "num_global_kv_heads": global_kv,
        "attention_k_eq_v": k_eq_v,
        "enable_moe_block": moe,
        "num_experts": f.int("num_experts", None),
        "top_k_experts": f.int("top_k_experts", None),
        "moe_intermediate_size": f.int("moe_intermediate_size", None),
        "hidden_size_per_layer_input": ple,
        # Gemma4TextConfig's default; 0 when PLE is off, where the GGUF reader has no table to size
        "vocab_size_per_layer_input": f.int("vocab_size_per_layer_input", 262_144) if ple else 0,
        "num_kv_shared_layers": f.int("num_kv_shared_layers", 0),
        "use_double_wide_mlp": f.bool("use_double_wide_mlp", False),
    }


def _special_ids(text: Mapping[str, Any], outer: Mapping[str, Any], key: str, default: Any) -> Any:
    """Explicit text_config value, else explicit wrapper value, else the class default."""
    for d in (text, outer):
        if key in d:
            return d[key]
    return default


def hf_config_from_dict(d: Mapping[str, Any], *, source: str = "config.json") -> GemmaConfig:
    """A config.json's contents (`source` names it in errors)."""
    model_type = d.get("model_type")
    text: Mapping[str, Any] = d
    prefix = ""
    family_name = model_type
    if model_type in _WRAPPERS:
        family_name = _WRAPPERS[model_type]
        text = d.get("text_config") or {}
        prefix = "text_config."
        if not isinstance(text, Mapping):
            raise ConfigError(f"field 'text_config' in {source} must be an object", hint="fix text_config")
    family = _FAMILIES.get(family_name)  # type: ignore[arg-type]
    if family is None:
        what = f"model_type {model_type!r} is not a supported Gemma model" if model_type else "has no model_type"
        raise ConfigError(f"{source}: {what}", hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    gen = family.generation
    f = _Fields({**family.defaults, **text}, source, prefix)
    for key in _REQUIRED:
        f.int(key)  # raises naming the field and file
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional is True or bidirectional == "all":
        raise ConfigError(
            f"{source}: use_bidirectional_attention={bidirectional!r} (an encoder such as EmbeddingGemma)",
            hint="rlx compiles causal decoders only",
        )
    n = f.int("num_hidden_layers")
    heads = f.int("num_attention_heads")
    types = _layer_types(f, gen, n)
    activation = f.str(family.activation_key, "gelu_pytorch_tanh")
    if gen == 1 and activation == "gelu":
        activation = "gelu_pytorch_tanh"  # GemmaConfig.__post_init__: legacy name of the tanh form
    rope = {t: _rope_spec(p, f"field '{prefix}rope_parameters.{t}' in {source}")
            for t, p in _ROPE_READERS[gen](f, types).items()}
    head_dim = f.int("head_dim", None) or f.int("hidden_size") // heads
    extras = _gemma4_fields(f, types) if gen == 4 else {}
    # transformers ties a wrapper's LM head by the wrapper's own flag, not text_config's
    tie = _Fields(d, source).bool("tie_word_embeddings", True) if prefix else f.bool("tie_word_embeddings")
    eos = _special_ids(text, d, "eos_token_id", family.defaults["eos_token_id"])
    return GemmaConfig(
        generation=gen,
        model_type=str(model_type),
        vocab_size=f.int("vocab_size"),
        hidden_size=f.int("hidden_size"),
        intermediate_size=f.int("intermediate_size"),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=f.float("rms_norm_eps"),
        query_pre_attn_scalar=f.float("query_pre_attn_scalar", None) if gen in (2, 3) else None,
        attn_softcap=f.float("attn_logit_softcapping", None) if gen in (2, 3) else None,
        final_softcap=f.float("final_logit_softcapping", None) if gen > 1 else None,
        sliding_window=f.int("sliding_window", None) if SLIDING in types else None,
        layer_types=tuple(types),
        rope=rope,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=f.int("max_position_embeddings"),
        bos_token_id=_special_ids(text, d, "bos_token_id", family.defaults["bos_token_id"]),
        eos_token_ids=_token_ids(eos),
        pad_token_id=_special_ids(text, d, "pad_token_id", family.defaults["pad_token_id"]),
        hidden_activation=activation,
        **extras,
        _source=source,
    )




def read_hf_config(path: str | Path) -> GemmaConfig:
    """`path` is a config.json or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"no config file at {path}", hint="point at a Hugging Face model directory") from err
    try:
        d = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
            hint="fix the file or re-download it",
        ) from err
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object", hint="re-download the config")
    return hf_config_from_dict(d, source=str(path))


__all__ = ["SUPPORTED_MODEL_TYPES", "default_layer_types", "hf_config_from_dict", "read_hf_config"]
