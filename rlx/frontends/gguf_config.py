"""GGUF metadata (llama.cpp conventions) -> `GemmaConfig`.

GGUF files store fewer facts than config.json; what llama.cpp derives from the architecture
name (layer pattern, score scale) is derived the same way here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rlx.errors import ConfigError
from rlx.frontends.config import FULL, SLIDING, GemmaConfig, RopeSpec
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.hf_config import default_layer_types

_MISSING: Any = object()

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
    return default_layer_types(gen, n, int(pattern or 6))


def _gguf_rope(meta: _GGUFMeta, gf: GGUFFile, gen: int, types: list[str], full_head_dim: int) -> dict[str, RopeSpec]:
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


def _gguf_gemma4(meta: _GGUFMeta, gf: GGUFFile, types: list[str], n: int, global_kv: int | None,
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


def gguf_config(gf: GGUFFile, *, source: str) -> GemmaConfig:
    """The config a parsed GGUF's metadata describes (`source` names the file in errors)."""
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


__all__ = ["gguf_config"]
