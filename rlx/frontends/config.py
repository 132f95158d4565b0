"""GemmaConfig: one frozen description of a Gemma LM, whatever file it came from.

Every default here is transformers' own (`models/gemma*/configuration_gemma*.py`, v5.24), because
a config.json may omit any field that has one. GGUF files store fewer facts; what llama.cpp
derives from the architecture name (layer pattern, score scale) is derived the same way here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from rlx.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
# transformers' `remap_legacy_layer_types`
_LEGACY_LAYER_TYPES = {"attention": FULL}

ROPE_KINDS = ("default", "linear", "proportional")


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding of one layer type, enough to rebuild transformers' `inv_freq`."""

    theta: float
    kind: str = "default"  # "default" | "linear" | "proportional"
    factor: float = 1.0  # linear / proportional: inv_freq /= factor
    partial_rotary_factor: float = 1.0  # proportional: fraction of head_dim that rotates

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ConfigError(
                f"RoPE kind {self.kind!r} is not supported",
                hint=f"use one of {', '.join(ROPE_KINDS)}",
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(
                f"RoPE theta ({self.theta}) and factor ({self.factor}) must be positive",
                hint="fix rope_theta / factor in the model config",
            )
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"RoPE partial_rotary_factor {self.partial_rotary_factor} is outside [0, 1]",
                hint="fix partial_rotary_factor in the model config",
            )

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32 [head_dim // 2], computed like transformers' rope init functions.

        The power is evaluated in float64 and rounded once (the correctly rounded float32 power),
        then inverted in float32 as torch does. torch's vectorised float32 `pow` (Sleef, 1 ulp)
        sometimes lands one ulp off, which the reciprocal can turn into 2 ulp; which values do
        depends on the CPU's SIMD level (torch's own scalar path agrees with us), so bit equality
        with torch is not portable -- tests allow 2 ulp (relative error < 2.4e-7).
        """
        if head_dim <= 0 or head_dim % 2:
            raise ConfigError(
                f"RoPE head_dim must be a positive even number, got {head_dim}",
                hint="fix head_dim in the model config",
            )
        half = head_dim // 2
        # proportional (Gemma 4 full layers): only the first pairs rotate, exponent still over head_dim
        rotated = int(self.partial_rotary_factor * head_dim // 2) if self.kind == "proportional" else half
        exponent = np.arange(0, 2 * rotated, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        base = np.float64(np.float32(self.theta))  # torch casts the python base to the tensor's float32
        power = (base ** exponent.astype(np.float64)).astype(np.float32)
        freqs = np.concatenate([np.float32(1.0) / power, np.zeros(half - rotated, dtype=np.float32)])
        if self.kind != "default":
            freqs = freqs / np.float32(self.factor)
        return freqs.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# GemmaConfig
# --------------------------------------------------------------------------------------------

# score scale per generation (transformers' `self.scaling`)
_SCORE_SCALE: dict[int, Callable[[GemmaConfig, int], float]] = {
    1: lambda c, i: c.layer_head_dim(i) ** -0.5,
    2: lambda c, i: float(c.query_pre_attn_scalar) ** -0.5,  # type: ignore[arg-type]
    3: lambda c, i: float(c.query_pre_attn_scalar) ** -0.5,  # type: ignore[arg-type]
    4: lambda c, i: 1.0,
}
# RMSNorm computes x * (shift + w): Gemma 1-3 store w - 1, Gemma 4 stores w
_NORM_SHIFT = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}


@dataclass(frozen=True)
class GemmaConfig:
    """Everything about a Gemma decoder that the compiler needs, per layer where it varies.

    `_source` (the file it came from) only makes validation errors name that file.
    """

    generation: int
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float | None
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope: Mapping[str, RopeSpec]
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    hidden_activation: str
    # Gemma 4 only; the defaults make them inert for 1-3
    global_head_dim: int | None = None
    num_global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0  # rows of `embed_tokens_per_layer`; 0 when PLE is off
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    _source: str = field(default="<config>", compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise containers once, here
        set_(self, "layer_types", tuple(self.layer_types))
        set_(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        set_(self, "rope", MappingProxyType(dict(self.rope)))
        self._validate()

    def _validate(self) -> None:
        src = self._source

        def bad(what: str, hint: str) -> ConfigError:
            return ConfigError(f"{src}: {what}", hint=hint)

        if self.generation not in _SCORE_SCALE:
            raise bad(f"generation {self.generation} is not a Gemma generation", "use 1, 2, 3 or 4")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise bad(f"{name} must be positive, got {getattr(self, name)}", f"fix {name}")
        if self.num_heads % self.num_kv_heads:
            raise bad(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})",
                "fix num_attention_heads / num_key_value_heads",
            )
        if len(self.layer_types) != self.num_layers:
            raise bad(
                f"layer_types has {len(self.layer_types)} entries but there are {self.num_layers} layers",
                "give one layer type per layer, or drop layer_types to use the default pattern",
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise bad(f"unknown layer types {unknown}", f"use {' or '.join(LAYER_TYPES)}")
        missing = sorted(set(self.layer_types) - set(self.rope))
        if missing:
            raise bad(f"no RoPE parameters for layer types {missing}", "add them to rope_parameters")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise bad("sliding layers exist but sliding_window is not set", "set sliding_window")
        if self.generation in (2, 3) and not self.query_pre_attn_scalar:
            raise bad("query_pre_attn_scalar is required for Gemma 2/3", "set query_pre_attn_scalar")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise bad(
                "enable_moe_block is set but num_experts / top_k_experts / moe_intermediate_size is missing",
                "set all three, or enable_moe_block=false",
            )
        if not 0 <= self.num_kv_shared_layers < self.num_layers or (
            self.num_kv_shared_layers and self.generation != 4
        ):
            raise bad(
                f"num_kv_shared_layers={self.num_kv_shared_layers} is invalid for {self.num_layers} layers",
                "use 0 <= num_kv_shared_layers < num_hidden_layers (Gemma 4 only)",
            )
        ple, ple_vocab = self.hidden_size_per_layer_input, self.vocab_size_per_layer_input
        if ple < 0 or (ple > 0) != (ple_vocab > 0) or (ple and self.generation != 4):
            raise bad(
                f"hidden_size_per_layer_input={ple} with vocab_size_per_layer_input={ple_vocab} is invalid",
                "per-layer embeddings (Gemma 4 only) need both positive, or both 0 to turn them off",
            )
        for i in range(self.num_layers):  # every shared layer needs a producer of its type
            self.kv_source_layer(i)

    # ---- identity --------------------------------------------------------------------------

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def norm_shift(self) -> float:
        """1.0 for Gemma 1-3 (RMSNorm scales by 1+w), 0.0 for Gemma 4 (scales by w)."""
        return _NORM_SHIFT[self.generation]

    # ---- per layer --------------------------------------------------------------------------

    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range (model has {self.num_layers} layers)")

    def layer_type(self, i: int) -> str:
        self._check_layer(i)
        return self.layer_types[i]

    def is_sliding(self, i: int) -> bool:
        return self.layer_type(i) == SLIDING

    def window(self, i: int) -> int | None:
        """Keys a query sees (itself included) on sliding layers; None on full layers."""
        return self.sliding_window if self.is_sliding(i) else None

    def layer_head_dim(self, i: int) -> int:
        if self.generation == 4 and not self.is_sliding(i) and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_k_eq_v(i) and self.num_global_kv_heads:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def layer_rope(self, i: int) -> RopeSpec:
        return self.rope[self.layer_type(i)]

    def layer_k_eq_v(self, i: int) -> bool:
        """Gemma 4 full layers with attention_k_eq_v: no v_proj, v = v_norm(k_proj(x))."""
        return self.attention_k_eq_v and not self.is_sliding(i)

    def score_scale(self, i: int) -> float:
        self._check_layer(i)
        return _SCORE_SCALE[self.generation](self, i)

    def is_kv_shared(self, i: int) -> bool:
        """Gemma 4: the last `num_kv_shared_layers` layers reuse an earlier layer's K/V."""
        self._check_layer(i)
        return self.num_kv_shared_layers > 0 and i >= self.num_layers - self.num_kv_shared_layers

    def kv_source_layer(self, i: int) -> int:
        """The layer whose K/V layer `i` attends over: itself, or (shared) the last producer of its type."""
        if not self.is_kv_shared(i):
            return i
        first_shared = self.num_layers - self.num_kv_shared_layers
        for j in range(first_shared - 1, -1, -1):
            if self.layer_types[j] == self.layer_types[i]:
                return j
        raise ConfigError(
            f"{self._source}: KV-shared layer {i} ({self.layer_types[i]}) has no earlier layer of its type",
            hint="fix layer_types or num_kv_shared_layers",
        )

    def layer_intermediate_size(self, i: int) -> int:
        """Gemma 4 `use_double_wide_mlp` doubles the MLP of KV-shared layers."""
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.is_kv_shared(i) else 1)

    # ---- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; `from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name == "rope":
                value = {k: spec.to_dict() for k, spec in sorted(value.items())}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> GemmaConfig:
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown GemmaConfig keys {unknown}", hint="remove them")
        try:
            kwargs = dict(d)
            kwargs["rope"] = {k: RopeSpec(**v) for k, v in d["rope"].items()}
            kwargs["layer_types"] = tuple(d["layer_types"])
            kwargs["eos_token_ids"] = tuple(d["eos_token_ids"])
            return cls(**kwargs, _source=source)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{source}: not a GemmaConfig dict ({err})", hint="write it with to_dict()") from err

    # ---- readers ----------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> GemmaConfig:
        return _from_hf(d, source)

    @classmethod
    def from_hf_file(cls, path: str | Path) -> GemmaConfig:
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
        return _from_hf(d, str(path))

    @classmethod
    def from_gguf(cls, reader: Any, *, source: str) -> GemmaConfig:
        """`reader` is a `gguf.GGUFReader` or an `rlx.frontends.gguf_file.GGUFFile`."""
        from rlx.frontends.gguf_file import GGUFFile

        gf = reader if isinstance(reader, GGUFFile) else GGUFFile.from_reader(reader)
        return _from_gguf(gf, source)


# --------------------------------------------------------------------------------------------
# Hugging Face config.json
# --------------------------------------------------------------------------------------------

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


def _default_layer_types(gen: int, n: int, period: int) -> list[str]:
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
        types = _default_layer_types(gen, n, period)
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


def _from_hf(d: Mapping[str, Any], source: str) -> GemmaConfig:
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


# --------------------------------------------------------------------------------------------
# GGUF metadata (llama.cpp conventions)
# --------------------------------------------------------------------------------------------

_GGUF_ARCHS = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma4": 4}
# llama.cpp: the 27B models scale scores by (hidden/heads)^-0.5 instead of head_dim^-0.5
_GGUF_27B_LAYERS = {2: 46, 3: 62}


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-6, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


class _GGUFMeta:
    """Keys under the architecture prefix, with errors that name the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, source: str) -> None:
        self.m, self.arch, self.source = metadata, arch, source

    def get(self, key: str, default: Any = _MISSING) -> Any:
        full = f"{self.arch}.{key}" if not key.startswith("tokenizer.") else key
        if full in self.m:
            return self.m[full]
        if default is _MISSING:
            raise ConfigError(
                f"{self.source}: GGUF metadata key {full!r} is missing",
                hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py",
            )
        return default

    def per_layer(self, key: str, n: int, default: Any = _MISSING) -> list[Any]:
        """A key llama.cpp stores as one value or one value per layer."""
        value = self.get(key, default)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(values) != n:
            raise ConfigError(
                f"{self.source}: GGUF key {self.arch}.{key} has {len(values)} entries for {n} layers",
                hint="re-convert the model",
            )
        return values


def _gguf_layer_types(meta: _GGUFMeta, gen: int, n: int) -> list[str]:
    if gen == 1 or meta.get("attention.sliding_window", None) is None:
        return [FULL] * n
    pattern = meta.get("attention.sliding_window_pattern", None)
    if isinstance(pattern, (list, tuple)):
        return [SLIDING if swa else FULL for swa in meta.per_layer("attention.sliding_window_pattern", n)]
    return _default_layer_types(gen, n, int(pattern or 6))


def _gguf_rope(meta: _GGUFMeta, gf: Any, gen: int, types: list[str], full_head_dim: int) -> dict[str, RopeSpec]:
    if gen < 3:
        spec = RopeSpec(theta=_f32(meta.get("rope.freq_base", 10_000.0)))
        return {t: spec for t in set(types)}
    full_theta = _f32(meta.get("rope.freq_base", 1_000_000.0))
    local = RopeSpec(theta=_f32(meta.get("rope.freq_base_swa", 10_000.0)))
    if gen == 4:
        # llama.cpp marks Gemma 4's non-rotating frequency pairs with a 1e30 factor in rope_freqs
        partial = 0.25
        if "rope_freqs.weight" in gf.tensors:
            factors = gf.array("rope_freqs.weight")
            partial = float(np.count_nonzero(factors < 1e20)) * 2 / full_head_dim
        full = RopeSpec(theta=full_theta, kind="proportional", partial_rotary_factor=partial)
    else:
        kind = meta.get("rope.scaling.type", "none")
        factor = _f32(meta.get("rope.scaling.factor", 1.0))
        full = RopeSpec(theta=full_theta, kind="linear", factor=factor) if kind == "linear" and factor != 1.0 \
            else RopeSpec(theta=full_theta)
        if kind not in ("none", "linear"):
            raise ConfigError(f"{meta.source}: rope.scaling.type {kind!r} is not supported", hint="use linear")
    return {SLIDING: local, FULL: full}


def _uniform(meta: _GGUFMeta, values: Iterable[int], what: str) -> int | None:
    distinct = set(values)
    if len(distinct) > 1:
        raise ConfigError(f"{meta.source}: {what} differ between layers ({sorted(distinct)})",
                          hint="rlx supports one value per layer type; re-convert the model")
    return distinct.pop() if distinct else None


def _gguf_kv_heads(meta: _GGUFMeta, types: list[str], kv_heads: list[int]) -> tuple[int, int | None]:
    """(sliding-layer KV heads, full-layer KV heads if they differ)."""
    local = _uniform(meta, (h for h, t in zip(kv_heads, types, strict=True) if t == SLIDING), "sliding KV head counts")
    full = _uniform(meta, (h for h, t in zip(kv_heads, types, strict=True) if t == FULL), "full KV head counts")
    if local is None or full is None or local == full:
        return (local if local is not None else full), None  # type: ignore[return-value]
    return local, full


def _gguf_gemma4(meta: _GGUFMeta, gf: Any, types: list[str], n: int, global_kv: int | None,
                 ff: list[int]) -> dict[str, Any]:
    shared = int(meta.get("attention.shared_kv_layers", 0))
    producers = [i for i, t in enumerate(types) if t == FULL and i < n - shared]
    # k_eq_v files have no attn_v on full layers (llama.cpp: v_proj is optional)
    k_eq_v = bool(producers) and f"blk.{producers[0]}.attn_v.weight" not in gf.tensors
    if global_kv is not None and not k_eq_v:
        raise ConfigError(f"{meta.source}: full layers have their own KV head count without k_eq_v",
                          hint="rlx supports global KV heads only with attention_k_eq_v; re-convert")
    experts = int(meta.get("expert_count", 0))
    ple = int(meta.get("embedding_length_per_layer_input", 0))
    ple_table = gf.tensors.get("per_layer_token_embd.weight")
    if ple and ple_table is None:
        raise ConfigError(f"{meta.source}: per-layer embeddings are on but per_layer_token_embd.weight is missing",
                          hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py")
    return {
        "global_head_dim": int(meta.get("attention.key_length")),
        "num_global_kv_heads": global_kv,
        "attention_k_eq_v": k_eq_v,
        "enable_moe_block": experts > 0,
        "num_experts": experts or None,
        "top_k_experts": int(meta.get("expert_used_count")) if experts else None,
        "moe_intermediate_size": int(meta.get("expert_feed_forward_length")) if experts else None,
        "hidden_size_per_layer_input": ple,
        # llama.cpp stores no vocab_size_per_layer_input: it is the PLE table's row count
        "vocab_size_per_layer_input": int(ple_table.shape[0]) if ple else 0,
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": max(ff) == 2 * min(ff),
    }


def _from_gguf(gf: Any, source: str) -> GemmaConfig:
    m = gf.metadata
    arch = m.get("general.architecture")
    gen = _GGUF_ARCHS.get(arch)  # type: ignore[arg-type]
    if gen is None:
        raise ConfigError(
            f"{source}: not a Gemma GGUF (general.architecture is {arch!r})",
            hint=f"rlx reads GGUF architectures {', '.join(_GGUF_ARCHS)}",
        )
    meta = _GGUFMeta(m, arch, source)
    n = int(meta.get("block_count"))
    hidden = int(meta.get("embedding_length"))
    heads = int(meta.per_layer("attention.head_count", n)[0])
    kv_heads = [int(v) for v in meta.per_layer("attention.head_count_kv", n, heads)]
    ff = [int(v) for v in meta.per_layer("feed_forward_length", n)]
    types = _gguf_layer_types(meta, gen, n)
    # Gemma 4: key_length is the full layers' head dim, key_length_swa the sliding one
    key_length = int(meta.get("attention.key_length", hidden // heads))
    head_dim = int(meta.get("attention.key_length_swa", key_length)) if gen == 4 else key_length
    local_kv, global_kv = _gguf_kv_heads(meta, types, kv_heads)
    extras = _gguf_gemma4(meta, gf, types, n, global_kv, ff) if gen == 4 else {}
    qpas = None
    if gen in (2, 3):
        # llama.cpp stores no query_pre_attn_scalar; honour an explicit attention.scale if a converter wrote one
        scale = meta.get("attention.scale", None)
        qpas = round(float(scale) ** -2, 4) if scale else float(hidden // heads if n == _GGUF_27B_LAYERS[gen]
                                                                   else head_dim)
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else gf.tensors["token_embd.weight"].shape[0]
    eos = [meta.get(f"tokenizer.ggml.{k}", None) for k in ("eos_token_id", "eot_token_id")]
    softcap_defaults = {2: (50.0, 30.0)}.get(gen, (None, None))
    attn_cap = meta.get("attn_logit_softcapping", softcap_defaults[0]) if gen == 2 else None
    final_cap = meta.get("final_logit_softcapping", softcap_defaults[1]) if gen > 1 else None
    return GemmaConfig(
        generation=gen,
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=min(ff),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=local_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32(meta.get("attention.layer_norm_rms_epsilon")),
        query_pre_attn_scalar=qpas,
        attn_softcap=None if attn_cap is None else _f32(attn_cap),
        final_softcap=None if final_cap is None else _f32(final_cap),
        sliding_window=int(meta.get("attention.sliding_window")) if SLIDING in types else None,
        layer_types=tuple(types),
        rope=_gguf_rope(meta, gf, gen, types, extras.get("global_head_dim") or head_dim),
        tie_word_embeddings="output.weight" not in gf.tensors,
        max_position_embeddings=int(meta.get("context_length", 8192)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", None),
        hidden_activation="gelu_pytorch_tanh",
        **extras,
        _source=source,
    )


__all__ = ["FULL", "LAYER_TYPES", "SLIDING", "SUPPORTED_MODEL_TYPES", "GemmaConfig", "RopeSpec"]
