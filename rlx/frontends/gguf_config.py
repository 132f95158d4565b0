"""GGUF metadata (llama.cpp conventions) -> `GemmaConfig`.

GGUF files store fewer facts than config.json; what llama.cpp derives from the architecture
name (layer pattern, score scale) is derived the same way here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rlx.errors import ConfigError
from rlx.frontends.config import (
    FULL,
    SLIDING,
    GemmaConfig,
    RopeSpec,
    ValueKind,
    check_list,
    check_value,
    describe,
)
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.hf_config import default_layer_types

_MISSING: Any = object()

_GGUF_ARCHS = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma4": 4}
# llama.cpp: the 27B models scale scores by (hidden/heads)^-0.5 instead of head_dim^-0.5
_GGUF_27B_LAYERS = {2: 46, 3: 62}


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-6, not 9.99999997e-07)."""
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, which the caller's check refuses
        return float(str(np.float32(value)))


class _GGUFMeta:
    """Keys under the architecture prefix, typed, with errors that name the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, source: str) -> None:
        self.m, self.arch, self.source = metadata, arch, source

    def _key(self, key: str) -> str:
        return f"{self.arch}.{key}" if not key.startswith("tokenizer.") else key

    def _where(self, key: str) -> str:
        return f"GGUF key {self._key(key)!r} in {self.source}"

    def check(self, key: str, value: Any, kind: ValueKind, *, many: bool = False) -> Any:
        """`value` (read from `key`) as `kind`, or a list of them (`many`); errors name the key and file."""
        what = f"a list of values, each {describe(kind)}" if many else describe(kind)
        hint = f"re-convert the model with a current llama.cpp convert_hf_to_gguf.py ({self._key(key)} is {what})"
        if many:
            return check_list(value, kind, self._where(key), hint=hint)
        return check_value(value, kind, self._where(key), hint=hint)

    def get(self, key: str, kind: ValueKind, default: Any = _MISSING) -> Any:
        """The value as `kind`; a missing key takes `default` (an error without one)."""
        full = self._key(key)
        if full not in self.m:
            if default is _MISSING:
                raise ConfigError(
                    f"{self.source}: GGUF metadata key {full!r} is missing",
                    hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py",
                )
            return default
        return self.check(key, self.m[full], kind)

    def f32(self, key: str, kind: ValueKind, default: Any = _MISSING) -> Any:
        """A float32 key as the decimal it was written from, checked as `kind` after the rounding."""
        value = self.get(key, kind, default)
        return None if value is None else self.check(key, _f32(value), kind)

    def per_layer(self, key: str, n: int, kind: ValueKind, default: Any = _MISSING) -> list[Any]:
        """A key llama.cpp stores as one value or one value per layer."""
        value = self.m.get(self._key(key), default)
        if not isinstance(value, (list, tuple)):
            return [self.get(key, kind, default)] * n
        values = self.check(key, value, kind, many=True)
        if len(values) != n:
            raise ConfigError(f"{self._where(key)} has {len(values)} entries for {n} layers",
                              hint="re-convert the model with a current llama.cpp convert_hf_to_gguf.py")
        return values


def _gguf_layer_types(meta: _GGUFMeta, gen: int, n: int) -> list[str]:
    if gen == 1 or meta.get("attention.sliding_window", "size", None) is None:
        return [FULL] * n
    if isinstance(meta.m.get(meta._key("attention.sliding_window_pattern")), (list, tuple)):
        return [SLIDING if swa else FULL for swa in meta.per_layer("attention.sliding_window_pattern", n, "bool")]
    return default_layer_types(gen, n, meta.get("attention.sliding_window_pattern", "count", 0) or 6)


def _gguf_rope(meta: _GGUFMeta, gf: GGUFFile, gen: int, types: list[str], full_head_dim: int) -> dict[str, RopeSpec]:
    if gen < 3:
        spec = RopeSpec(theta=meta.f32("rope.freq_base", "positive", 10_000.0))
        return {t: spec for t in set(types)}
    full_theta = meta.f32("rope.freq_base", "positive", 1_000_000.0)
    local = RopeSpec(theta=meta.f32("rope.freq_base_swa", "positive", 10_000.0))
    if gen == 4:
        # llama.cpp marks Gemma 4's non-rotating frequency pairs with a 1e30 factor in rope_freqs
        partial = 0.25
        if "rope_freqs.weight" in gf.tensors:
            rotating = int(np.count_nonzero(gf.array("rope_freqs.weight") < 1e20))
            if 2 * rotating > full_head_dim:
                raise ConfigError(f"{meta.source}: rope_freqs.weight marks {rotating} rotating frequency pairs, more "
                                  f"than a {full_head_dim}-wide head has", hint="re-convert the model")
            partial = 2 * rotating / full_head_dim
        full = RopeSpec(theta=full_theta, kind="proportional", partial_rotary_factor=partial)
    else:
        kind = meta.get("rope.scaling.type", "str", "none")
        factor = meta.f32("rope.scaling.factor", "positive", 1.0)
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
        return (local if local is not None else full), None  # type: ignore[return-value]  # _uniform: one is set
    return local, full


def _gguf_gemma4(meta: _GGUFMeta, gf: GGUFFile, types: list[str], n: int, global_kv: int | None,
                 ff: list[int]) -> dict[str, Any]:
    shared = meta.get("attention.shared_kv_layers", "count", 0)
    producers = [i for i, t in enumerate(types) if t == FULL and i < n - shared]
    # k_eq_v files have no attn_v on full layers (llama.cpp: v_proj is optional)
    k_eq_v = bool(producers) and f"blk.{producers[0]}.attn_v.weight" not in gf.tensors
    if global_kv is not None and not k_eq_v:
        raise ConfigError(f"{meta.source}: full layers have their own KV head count without k_eq_v",
                          hint="rlx supports global KV heads only with attention_k_eq_v; re-convert")
    experts = meta.get("expert_count", "count", 0)
    ple = meta.get("embedding_length_per_layer_input", "count", 0)
    return {
        "global_head_dim": meta.get("attention.key_length", "size"),
        "num_global_kv_heads": global_kv,
        "attention_k_eq_v": k_eq_v,
        "enable_moe_block": experts > 0,
        "num_experts": experts or None,
        "top_k_experts": meta.get("expert_used_count", "size") if experts else None,
        "moe_intermediate_size": meta.get("expert_feed_forward_length", "size") if experts else None,
        "hidden_size_per_layer_input": ple,
        # llama.cpp stores no vocab_size_per_layer_input: it is the PLE table's row count (which must exist)
        "vocab_size_per_layer_input": gf.require("per_layer_token_embd.weight", 2).shape[0] if ple else 0,
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": max(ff) == 2 * min(ff),
    }


def gguf_config(gf: GGUFFile, *, source: str) -> GemmaConfig:
    """The config a parsed GGUF's metadata describes (`source` names the file in errors)."""
    m = gf.metadata
    arch = m.get("general.architecture")
    gen = _GGUF_ARCHS.get(arch) if isinstance(arch, str) else None
    if gen is None or not isinstance(arch, str):
        raise ConfigError(
            f"{source}: not a Gemma GGUF (general.architecture is {arch!r})",
            hint=f"rlx reads GGUF architectures {', '.join(_GGUF_ARCHS)}",
        )
    meta = _GGUFMeta(m, arch, source)
    n = meta.get("block_count", "layers")
    hidden = meta.get("embedding_length", "size")
    heads = meta.per_layer("attention.head_count", n, "size")[0]
    kv_heads = meta.per_layer("attention.head_count_kv", n, "size", heads)
    ff = meta.per_layer("feed_forward_length", n, "size")
    types = _gguf_layer_types(meta, gen, n)
    # Gemma 4: key_length is the full layers' head dim, key_length_swa the sliding one
    key_length = meta.get("attention.key_length", "size", hidden // heads)
    head_dim = meta.get("attention.key_length_swa", "size", key_length) if gen == 4 else key_length
    local_kv, global_kv = _gguf_kv_heads(meta, types, kv_heads)
    extras = _gguf_gemma4(meta, gf, types, n, global_kv, ff) if gen == 4 else {}
    qpas = None
    if gen in (2, 3):
        # llama.cpp stores no query_pre_attn_scalar; honour an explicit attention.scale if a converter wrote one
        scale = meta.f32("attention.scale", "positive", None)
        qpas = round(scale ** -2, 4) if scale else float(hidden // heads if n == _GGUF_27B_LAYERS[gen] else head_dim)
    tokens = meta.m.get("tokenizer.ggml.tokens")
    # without a token list the vocabulary is the embedding's rows
    vocab = gf.require("token_embd.weight", 2).shape[0] if tokens is None else \
        len(meta.check("tokenizer.ggml.tokens", tokens, "str", many=True))
    eos = [meta.get(f"tokenizer.ggml.{k}", "count", None) for k in ("eos_token_id", "eot_token_id")]
    softcap_defaults = {2: (50.0, 30.0)}.get(gen, (None, None))
    return GemmaConfig(
        generation=gen,
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=min(ff),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=local_kv,
        head_dim=head_dim,
        rms_norm_eps=meta.f32("attention.layer_norm_rms_epsilon", "float"),
        query_pre_attn_scalar=qpas,
        attn_softcap=meta.f32("attn_logit_softcapping", "positive", softcap_defaults[0]) if gen == 2 else None,
        final_softcap=meta.f32("final_logit_softcapping", "positive", softcap_defaults[1]) if gen > 1 else None,
        sliding_window=meta.get("attention.sliding_window", "size") if SLIDING in types else None,
        layer_types=tuple(types),
        rope=_gguf_rope(meta, gf, gen, types, extras.get("global_head_dim") or head_dim),
        tie_word_embeddings="output.weight" not in gf.tensors,
        max_position_embeddings=meta.get("context_length", "size", 8192),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", "count", None),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", "count", None),
        hidden_activation="gelu_pytorch_tanh",
        **extras,
        _source=source,
    )


__all__ = ["gguf_config"]
