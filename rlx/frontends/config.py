"""GemmaConfig: one frozen description of a Gemma LM, whatever file it came from.

The readers are `hf_config` (config.json) and `gguf_config` (GGUF metadata). What a generation
computes beyond the config's numbers (norm offset, extra norms, q/k/v norms, score scale, layer
scalar) is one row of `GENERATIONS`, read through `GemmaConfig.traits`: the graph builder asks
the config, never the generation number.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from rlx.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

ROPE_KINDS = ("default", "linear", "proportional")
# more layers than any model has: a bigger count is corrupt, and per-layer lists must stay small
MAX_LAYERS = 1 << 16


# --------------------------------------------------------------------------------------------
# Typed values: the one check every reader (config.json, GGUF metadata, manifests) goes through
# --------------------------------------------------------------------------------------------

ValueKind = Literal["int", "count", "size", "layers", "float", "positive", "fraction", "bool", "str", "object"]
_INT_LIMIT = 1 << 63  # beyond int64 no shape or id fits numpy / TVM


def _is_int(v: Any) -> bool:
    """An integer (bools excluded), or a float with an integral value (configs sometimes say 2048.0)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return v.is_integer() and abs(v) < _INT_LIMIT
    return isinstance(v, numbers.Integral) and -_INT_LIMIT <= int(v) < _INT_LIMIT


def _is_finite(v: Any) -> bool:
    """A real number that is not inf / nan (JSON's `Infinity`, `NaN` and `1e999` parse as such)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


# kind -> (what the value must be, the test, the conversion)
VALUE_KINDS: dict[ValueKind, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    "int": ("an integer", _is_int, int),
    "count": ("a non-negative integer", lambda v: _is_int(v) and v >= 0, int),
    "size": ("a positive integer", lambda v: _is_int(v) and v > 0, int),
    "layers": (f"a layer count from 1 to {MAX_LAYERS}", lambda v: _is_int(v) and 0 < v <= MAX_LAYERS, int),
    "float": ("a finite number", _is_finite, float),
    "positive": ("a positive finite number", lambda v: _is_finite(v) and v > 0, float),
    "fraction": ("a number from 0 to 1", lambda v: _is_finite(v) and 0 <= v <= 1, float),
    "bool": ("a boolean", lambda v: isinstance(v, (bool, np.bool_)), bool),
    "str": ("a string", lambda v: isinstance(v, str), str),
    "object": ("an object", lambda v: isinstance(v, Mapping), dict),
}


def describe(kind: ValueKind) -> str:
    """What a value of `kind` must be ("a positive integer"), for messages and hints."""
    return VALUE_KINDS[kind][0]


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def check_value(value: Any, kind: ValueKind, where: str, *, hint: str) -> Any:
    """`value` converted to `kind`, or a ConfigError saying what `where` (the key and file) must be."""
    what, ok, convert = VALUE_KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{where} must be {what}, got {_show(value)}", hint=hint)
    return convert(value)


def check_list(value: Any, kind: ValueKind, where: str, *, hint: str) -> list[Any]:
    """A list (or tuple) whose entries are each `kind`, converted; the error names the bad entry."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of values, each {describe(kind)}, got {_show(value)}", hint=hint)
    ok = VALUE_KINDS[kind][1]
    bad = next((i for i, v in enumerate(value) if not ok(v)), None)
    if bad is not None:
        check_value(value[bad], kind, f"{where}, entry {bad},", hint=hint)
    return [VALUE_KINDS[kind][2](v) for v in value]


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
        for name, kind in _ROPE_FIELD_KINDS.items():  # frozen: store the converted value
            object.__setattr__(self, name, check_value(getattr(self, name), kind, f"RoPE {name}",
                                                       hint=f"set {name} to {describe(kind)} in the model config"))
        if self.kind not in ROPE_KINDS:
            raise ConfigError(
                f"RoPE kind {self.kind!r} is not supported",
                hint=f"use one of {', '.join(ROPE_KINDS)}",
            )

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> RopeSpec:
        """Inverts `to_dict`; `where` names the entry ("manifest.json: rope.full_attention") in errors."""
        hint = "write it with RopeSpec.to_dict()"
        d = check_value(d, "object", where, hint=hint)
        unknown = sorted(set(d) - set(_ROPE_FIELD_KINDS))
        if unknown or "theta" not in d:
            what = f"unknown keys {unknown}" if unknown else "no theta"
            raise ConfigError(f"{where}: {what} (a RoPE entry has {', '.join(_ROPE_FIELD_KINDS)})", hint=hint)
        try:
            return cls(**d)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err.message}", hint=err.hint) from None

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


_ROPE_FIELD_KINDS: dict[str, ValueKind] = {
    "theta": "positive", "kind": "str", "factor": "positive", "partial_rotary_factor": "fraction",
}


# --------------------------------------------------------------------------------------------
# GemmaConfig
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationTraits:
    """What one Gemma generation's decoder computes beyond the config's numbers (transformers'
    `modeling_gemma*.py`)."""

    norm_shift: float        # RMSNorm scales by (shift + w): Gemma 1-3 store w - 1, Gemma 4 stores w
    sandwich_norms: bool     # post-attention / pre- and post-feedforward norms (4 per block, Gemma 2+)
    qk_norm: bool            # RMSNorm over q and k heads before RoPE (Gemma 3+)
    v_norm: bool             # weightless RMSNorm over v heads (Gemma 4)
    layer_scalar: bool       # the block's output times a learned scalar (Gemma 4)
    score_scale: Callable[[GemmaConfig, int], float]  # transformers' `self.scaling`, per layer


GENERATIONS: dict[int, GenerationTraits] = {
    1: GenerationTraits(1.0, False, False, False, False, lambda c, i: c.layer_head_dim(i) ** -0.5),
    2: GenerationTraits(1.0, True, False, False, False,
                        lambda c, i: float(c.query_pre_attn_scalar) ** -0.5),  # type: ignore[arg-type]  # set for 2, 3
    3: GenerationTraits(1.0, True, True, False, False,
                        lambda c, i: float(c.query_pre_attn_scalar) ** -0.5),  # type: ignore[arg-type]  # set for 2, 3
    4: GenerationTraits(0.0, True, True, True, True, lambda c, i: 1.0),
}


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
        self._check_types()
        self._validate()

    def _check_types(self) -> None:
        """Every field has its kind (a manifest or a caller may hand in anything); frozen, so the
        converted values and normalised containers are set once, here."""
        set_ = object.__setattr__
        src = self._source

        def hint(name: str, kind: ValueKind) -> str:
            return f"set {name} to {describe(kind)} (or rebuild the config from the model's config.json)"

        for f in fields(self):
            value, kind = getattr(self, f.name), _FIELD_KINDS.get(f.name)
            if kind is not None and not (value is None and str(f.type).endswith("| None")):
                set_(self, f.name, check_value(value, kind, f"{src}: {f.name}", hint=hint(f.name, kind)))
        lists: tuple[tuple[str, ValueKind], ...] = (("layer_types", "str"), ("eos_token_ids", "int"))
        for name, item in lists:
            set_(self, name, tuple(check_list(getattr(self, name), item, f"{src}: {name}", hint=hint(name, item))))
        rope = check_value(self.rope, "object", f"{src}: rope", hint=hint("rope", "object"))
        bad = next((k for k, v in rope.items() if not isinstance(k, str) or not isinstance(v, RopeSpec)), None)
        if bad is not None:
            raise ConfigError(f"{src}: rope[{bad!r}] is not a RopeSpec", hint="build rope with RopeSpec entries")
        set_(self, "rope", MappingProxyType(rope))

    def _validate(self) -> None:
        """How the (well-typed) fields fit together."""
        src = self._source

        def bad(what: str, hint: str) -> ConfigError:
            return ConfigError(f"{src}: {what}", hint=hint)

        if self.generation not in GENERATIONS:
            raise bad(f"generation {self.generation} is not a Gemma generation", "use 1, 2, 3 or 4")
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
        if (ple > 0) != (ple_vocab > 0) or (ple and self.generation != 4):
            raise bad(
                f"hidden_size_per_layer_input={ple} with vocab_size_per_layer_input={ple_vocab} is invalid",
                "per-layer embeddings (Gemma 4 only) need both positive, or both 0 to turn them off",
            )
        first_shared = self.num_layers - self.num_kv_shared_layers
        orphans = set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared])
        if orphans:  # every shared layer needs a producer of its type (kv_source_layer)
            i = next(i for i in range(first_shared, self.num_layers) if self.layer_types[i] in orphans)
            self.kv_source_layer(i)

    # ---- identity --------------------------------------------------------------------------

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def traits(self) -> GenerationTraits:
        return GENERATIONS[self.generation]

    @property
    def norm_shift(self) -> float:
        """1.0 for Gemma 1-3 (RMSNorm scales by 1+w), 0.0 for Gemma 4 (scales by w)."""
        return self.traits.norm_shift

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
        return self.traits.score_scale(self, i)

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
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> GemmaConfig:
        """Inverts `to_dict` (an artifact's manifest holds it); every bad key is a ConfigError naming it."""
        hint = "write it with GemmaConfig.to_dict(), or recompile the artifact"
        d = check_value(d, "object", f"{source}: the GemmaConfig", hint=hint)
        public = [f for f in fields(cls) if not f.name.startswith("_")]
        unknown = sorted(map(str, set(d) - {f.name for f in public}))
        if unknown:
            raise ConfigError(f"{source}: unknown GemmaConfig keys {unknown}", hint="remove them")
        missing = [f.name for f in public if f.name not in d and f.default is MISSING]
        if missing:
            raise ConfigError(f"{source}: GemmaConfig keys {missing} are missing", hint=hint)
        rope = check_value(d["rope"], "object", f"{source}: rope", hint=hint)
        kwargs = {**d, "rope": {k: RopeSpec.from_dict(v, where=f"{source}: rope.{k}") for k, v in rope.items()}}
        return cls(**kwargs, _source=source)


# GemmaConfig field -> its kind (layer_types, eos_token_ids and rope are containers, checked apart);
# tests/frontends/test_bad_inputs.py checks that every field is covered
_FIELD_KINDS: dict[str, ValueKind] = {
    "generation": "int", "model_type": "str", "vocab_size": "size", "hidden_size": "size",
    "intermediate_size": "size", "num_layers": "layers", "num_heads": "size", "num_kv_heads": "size",
    "head_dim": "size", "rms_norm_eps": "float", "query_pre_attn_scalar": "positive", "attn_softcap": "positive",
    "final_softcap": "positive", "sliding_window": "size", "tie_word_embeddings": "bool",
    "max_position_embeddings": "size", "bos_token_id": "int", "pad_token_id": "int", "hidden_activation": "str",
    "global_head_dim": "size", "num_global_kv_heads": "size", "attention_k_eq_v": "bool", "enable_moe_block": "bool",
    "num_experts": "size", "top_k_experts": "size", "moe_intermediate_size": "size",
    "hidden_size_per_layer_input": "count", "vocab_size_per_layer_input": "count", "num_kv_shared_layers": "count",
    "use_double_wide_mlp": "bool",
}


__all__ = ["FULL", "GENERATIONS", "LAYER_TYPES", "MAX_LAYERS", "SLIDING", "VALUE_KINDS", "GemmaConfig",
           "GenerationTraits", "RopeSpec", "ValueKind", "check_list", "check_value", "describe"]
