"""WeightStore: lazy access to a checkpoint's LM tensors under one canonical naming.

Canonical names are transformers' Gemma text-decoder names with the wrapper prefixes stripped
(`layers.3.self_attn.q_proj.weight`, `embed_tokens.weight`, ...), whatever the file: HF
safetensors (single, sharded, any generation's prefix) or a llama.cpp GGUF. Tensors are read
one at a time from memory maps and returned as fresh float32 arrays in HF layout, with GGUF's
`+1` on Gemma 1-3 norm weights undone, so callers never see file conventions.
"""

from __future__ import annotations

import difflib
import json
import mmap
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from rlx.errors import WeightError
from rlx.frontends.config import GemmaConfig
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.safetensors_file import read_header
from rlx.hir.quant import QuantFormat, gguf_format_of
from rlx.progress import track

LM_HEAD, EMBED = "lm_head.weight", "embed_tokens.weight"

# ---- HF names -------------------------------------------------------------------------------

# wrapper prefixes of released checkpoints, longest first
# (Gemma3/4ForConditionalGeneration: `model.language_model.`; older Gemma 3: `language_model.model.`)
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")
# first name component of the text decoder's tensors; everything else (vision, audio) is ignored
_TEXT_ROOTS = frozenset({
    "embed_tokens", "norm", "layers", "lm_head",
    "embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm",
})


def canonical_hf_name(name: str) -> str | None:
    """The canonical name of an HF tensor, or None for tensors outside the text decoder."""
    for prefix in _HF_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.split(".", 1)[0] in _TEXT_ROOTS:
                return rest
    return None


# ---- GGUF names (llama.cpp convert_hf_to_gguf.py / gguf-py tensor_mapping.py) ----------------

_GGUF_GLOBAL = {
    "token_embd.weight": EMBED,
    "output_norm.weight": "norm.weight",
    "output.weight": LM_HEAD,
    "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Gemma 4 (MoE, per-layer embeddings, layer scalar)
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
# Gemma 1 has no pre/post-FFN norm pair: its pre-MLP norm (HF post_attention_layernorm) is ffn_norm
_GGUF_BLOCK_BY_GEN = {1: {**_GGUF_BLOCK, "ffn_norm.weight": "post_attention_layernorm.weight"}}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def canonical_gguf_name(name: str, generation: int) -> str | None:
    """The canonical name of a llama.cpp tensor, or None if it has no HF counterpart."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    match = _BLOCK.fullmatch(name)
    if match is None:
        return None
    suffix = _GGUF_BLOCK_BY_GEN.get(generation, _GGUF_BLOCK).get(match.group(2))
    return None if suffix is None else f"layers.{match.group(1)}.{suffix}"


# ---- safetensors ----------------------------------------------------------------------------


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# safetensors dtype -> (readable name, numpy storage dtype, to-float32)
_ST_DTYPES: dict[str, tuple[str, Any, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": ("float32", np.float32, lambda a: a.astype(np.float32)),
    "F16": ("float16", np.float16, lambda a: a.astype(np.float32)),
    "BF16": ("bfloat16", np.uint16, _bf16_to_f32),
    "F64": ("float64", np.float64, lambda a: a.astype(np.float32)),
    "I64": ("int64", np.int64, lambda a: a.astype(np.float32)),
    "I32": ("int32", np.int32, lambda a: a.astype(np.float32)),
    "I16": ("int16", np.int16, lambda a: a.astype(np.float32)),
    "I8": ("int8", np.int8, lambda a: a.astype(np.float32)),
    "U8": ("uint8", np.uint8, lambda a: a.astype(np.float32)),
    "BOOL": ("bool", np.bool_, lambda a: a.astype(np.float32)),
}


class _SafetensorsFile:
    """One mapped .safetensors file: its header, and views of its tensors' bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        hint = "re-download the checkpoint"
        try:
            with open(path, "rb") as fh:
                header, self.data_start = read_header(fh)  # checks every entry against the file
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            raise WeightError(f"cannot read weight file {path}: {err.strerror}", hint=hint) from err
        except ValueError as err:
            raise WeightError(f"{path} is not a valid safetensors file: {err}", hint=hint) from err
        self.header: dict[str, dict[str, Any]] = header

    def read(self, name: str) -> np.ndarray:
        h = self.header[name]
        dtype = h["dtype"]
        if dtype not in _ST_DTYPES:
            raise WeightError(
                f"{self.path}: tensor {name} has dtype {dtype}, which rlx cannot read",
                hint=f"convert the checkpoint to one of {', '.join(_ST_DTYPES)}",
            )
        _, storage, to_f32 = _ST_DTYPES[dtype]
        shape = tuple(h["shape"])  # read_header checked that data_offsets hold exactly this many values
        raw = np.frombuffer(self.mm, dtype=storage, count=prod(shape), offset=self.data_start + h["data_offsets"][0])
        return np.ascontiguousarray(to_f32(raw), dtype=np.float32).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF dir (single or sharded) or a lone .safetensors file."""
    if path.is_file():
        return [path]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as err:  # ValueError: also not UTF-8
            raise WeightError(f"{index} is not a valid safetensors index ({err})",
                              hint="re-download the checkpoint") from err
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightError(f"{index}: weight_map must map tensor names to shard file names",
                              hint="re-download the checkpoint")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} names shards that are missing: {missing}",
                              hint="download every shard of the checkpoint")
        return files
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise WeightError(f"no *.safetensors weights in {path}",
                          hint="download the model's safetensors files (rlx does not read .bin/.pth)")
    return found


# ---- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Where one canonical tensor lives and how to read it."""

    stored_name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    shift: float = 0.0  # subtracted after reading (GGUF Gemma 1-3 norms hold 1 + w)
    blocks: Callable[[], np.ndarray] | None = None  # a GGUF tensor's stored bytes (no copy)


class WeightStore:
    """A checkpoint's LM tensors by canonical name; reads on demand and caches nothing."""

    def __init__(self, source: Path, config: GemmaConfig, entries: Mapping[str, _Entry],
                 files: list[Path], gguf_file: GGUFFile | None = None) -> None:
        self.source = source
        self.config = config
        self.files = list(files)  # every file the tensors come from (for hashing, messages)
        self._entries = dict(entries)
        self._gguf = gguf_file

    @classmethod
    def open(cls, path: str | Path, config: GemmaConfig) -> WeightStore:
        """An HF dir (model.safetensors or a sharded index), a single .safetensors, or a .gguf."""
        path = Path(path)
        if not path.exists():
            raise WeightError(f"weights not found: {path}", hint="pass an HF model directory or a .gguf file")
        if path.suffix == ".gguf":
            return cls.from_gguf(GGUFFile.open(path), config)
        entries: dict[str, _Entry] = {}
        files = _safetensors_files(path)
        for file in files:
            st = _SafetensorsFile(file)
            for name, h in st.header.items():
                canonical = canonical_hf_name(name)
                if canonical is None:
                    continue
                entries[canonical] = _Entry(
                    name, file, _ST_DTYPES.get(h["dtype"], (h["dtype"],))[0],
                    tuple(int(d) for d in h["shape"]), partial(st.read, name),
                )
        return cls(path, config, entries, files)

    @classmethod
    def from_gguf(cls, gf: GGUFFile, config: GemmaConfig) -> WeightStore:
        """A store over an already-parsed GGUF (shared with the config and tokenizer readers)."""
        gf.require("token_embd.weight", 2)  # every Gemma reads it; a file without it is not a model
        entries: dict[str, _Entry] = {}
        for name, info in gf.tensors.items():
            canonical = canonical_gguf_name(name, config.generation)
            if canonical is None:
                continue
            shift = config.norm_shift if canonical.endswith("norm.weight") else 0.0
            entries[canonical] = _Entry(name, gf.path, info.type_name, info.shape,
                                        partial(gf.array, name), shift, partial(gf.raw, name))
        return cls(gf.path, config, entries, [gf.path], gf)

    # ---- lookup -----------------------------------------------------------------------------

    @property
    def gguf_metadata(self) -> Mapping[str, Any] | None:
        """The GGUF key/value metadata (tokenizer.ggml.* ...), or None for safetensors."""
        return None if self._gguf is None else self._gguf.metadata

    def _resolve(self, name: str) -> str:
        # a tied head is the embedding, even where a file also stores lm_head.weight
        return EMBED if name == LM_HEAD and self.config.tie_word_embeddings else name

    def names(self) -> list[str]:
        """Stored canonical names, sorted; a tied `lm_head.weight` is an alias, not listed."""
        return sorted(n for n in self._entries if self._resolve(n) == n)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) in self._entries

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(self._resolve(name))
        if entry is None:
            raise self._missing(name)
        return entry

    def _missing(self, name: str) -> WeightError:
        near = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        has = f"nearest: {', '.join(near)}" if near else f"{len(self._entries)} LM tensors"
        hint = "the weights do not match the config; re-download the checkpoint or fix config.json"
        if name == LM_HEAD:
            hint = "the config says tie_word_embeddings=false but the file has no LM head; fix the config"
        return WeightError(f"missing tensor {name} in {self.source} (file has {has})", hint=hint)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """As stored: "bfloat16", "float32", ... for safetensors; "Q4_K", "F32", ... for GGUF."""
        return self._entry(name).dtype

    def get(self, name: str) -> np.ndarray:
        """A fresh float32 array in HF layout and HF meaning (norm shift undone); not cached."""
        entry = self._entry(name)
        array = entry.read()
        if entry.shift:
            array -= np.float32(entry.shift)
        return array

    def stored_blocks(self, name: str) -> np.ndarray | None:
        """A GGUF tensor's stored bytes as rows [rows, row_bytes] (a read-only view of the file),
        or None for tensors stored as plain numbers (safetensors, or GGUF floats)."""
        entry = self._entry(name)
        if entry.blocks is None or entry.shift or gguf_format_of(entry.dtype) is None:
            return None
        raw = entry.blocks()
        return raw.reshape(*entry.shape[:-1], raw.size // max(1, prod(entry.shape[:-1])))

    def require(self, name: str, shape: tuple[int, ...]) -> None:
        """WeightError unless `name` exists with exactly `shape`."""
        entry = self._entry(name)
        if tuple(entry.shape) != tuple(shape):
            stored = f" (stored as {entry.stored_name})" if entry.stored_name != name else ""
            raise WeightError(
                f"tensor {name}{stored} in {entry.file} has shape {tuple(entry.shape)}, expected {tuple(shape)}",
                hint="the weights do not match the config; re-download the checkpoint or fix config.json",
            )

    def nbytes_f32(self) -> int:
        """Bytes all stored LM tensors take as float32 (a tied head counted once)."""
        return sum(4 * prod(self._entries[n].shape) for n in self.names())

    def __repr__(self) -> str:
        return f"WeightStore({self.source}, {len(self._entries)} tensors)"


class WeightCache:
    """Each tensor of a store loaded once as float32, shared by every graph that reads it (the
    interpreter's weight source, and what compile materialises the artifact's params from)."""

    def __init__(self, store: WeightStore) -> None:
        self._store = store
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.ascontiguousarray(self._store.get(name), dtype=np.float32)
        return self._cache[name]

    def release(self, name: str) -> None:
        """Drop a tensor nobody needs any more (it would be loaded again if asked for)."""
        self._cache.pop(name, None)

    def packed(self, name: str, fmt: QuantFormat) -> np.ndarray | None:
        """The tensor's blocks when the checkpoint stores it in `fmt` (a GGUF's own, kept exactly
        as stored and never dequantized), else None (the caller quantizes the float values)."""
        if fmt.gguf_type is None or self._store.dtype(name) != fmt.gguf_type:
            return None
        return self._store.stored_blocks(name)

    def preload(self, names: list[str]) -> None:
        """Load (dequantize) every tensor up front, with progress, so timings measure compute."""
        for name in track(sorted(set(names)), "loading weights"):
            self(name)


__all__ = ["WeightCache", "WeightStore", "canonical_gguf_name", "canonical_hf_name"]
