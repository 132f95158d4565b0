"""Property-based fuzzing of the three readers (config.json, safetensors headers, GGUF): whatever
the input, a reader returns a model or raises its documented error, with a fix; anything else (a
KeyError, a TypeError, an OverflowError from deep inside) is a bug the CLI would print as a traceback."""

from __future__ import annotations

import copy
import io
import itertools
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlx.errors import ConfigError, RlxError, WeightError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.config import GemmaConfig
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.hf_config import hf_config_from_dict, read_hf_config
from rlx.frontends.safetensors_file import DTYPE_BITS, read_header
from rlx.frontends.weights import WeightStore
from tests.fixtures.gguf_writer import MINIMAL_GEMMA3, T, write_gguf, write_gguf_from_hf
from tests.fixtures.tiny import _JSON_REWRITES, FAMILIES

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- shared strategies --------------------------------------------------------------------------

_LEAF = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
         | st.sampled_from([0, -1, 1, 2, 10 ** 30, 1e999, -1e999, float("nan"), 0.5, "", "1"]))
JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=8)


def _confused(value: Any) -> st.SearchStrategy[Any]:
    """Near misses of `value`: its text, wrapped in a list / object, negated, zero, huge, fractional."""
    near: list[Any] = [str(value), [value], {"value": value}, None, True, False, 0, -1, 2 ** 70, float("nan")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        near += [-value, value + 0.5, value * 10 ** 6, float(value)]
    if isinstance(value, list) and value:
        near += [value[0], value[:-1], value + value[-1:], [str(v) for v in value]]
    if isinstance(value, dict):
        near += [list(value.values()), list(value)]
    return st.sampled_from(near) | JSON


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place inside a JSON value (dict keys, list indices), the value itself excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield (*prefix, key)
        yield from _paths(inner, (*prefix, key))


@st.composite
def mutated(draw: st.DrawFn, bases: Sequence[Any], extra_keys: Sequence[str] = ()) -> Any:
    """A deep copy of one of `bases` with 1-3 edits: a value deleted, replaced by random JSON or by a
    near miss of itself, or a known key added."""
    value = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(value))
        op = draw(st.sampled_from(["delete", "replace", "confuse", "add"]))
        if op == "add" and extra_keys and isinstance(value, dict):
            value[draw(st.sampled_from(extra_keys))] = draw(JSON)
            continue
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_confused(parent[path[-1]]) if op == "confuse" else JSON)
    return value


def _fails_cleanly(call: Callable[[], Any], *errors: type[BaseException]) -> Any:
    """`call()`'s result, or None where it raised one of `errors` (an RlxError must carry a fix)."""
    try:
        return call()
    except errors as err:
        if isinstance(err, RlxError):
            assert err.hint, f"{type(err).__name__} without a fix: {err.message}"
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A fresh file name per example: readers mmap their files, so one is never rewritten in place."""
    root = tmp_path_factory.mktemp("fuzz")
    counter = itertools.count()
    return lambda suffix: root / f"{next(counter)}{suffix}"


# ---- (a) config.json ----------------------------------------------------------------------------


def _family_config(family: str) -> dict[str, Any]:
    """The config.json the tiny checkpoint of `family` has (without building its weights)."""
    d = json.loads(FAMILIES[family]().to_json_string())
    if (rewrite := _JSON_REWRITES.get(family)) is not None:
        rewrite(d)
    return d


CONFIGS = [_family_config(f) for f in sorted(FAMILIES)]
CONFIG_KEYS = sorted({k for d in CONFIGS for k in d} | {k for d in CONFIGS for k in d.get("text_config") or {}})


def _read_config(d: Any) -> GemmaConfig | None:
    cfg = _fails_cleanly(lambda: hf_config_from_dict(d, source="fuzz/config.json"), ConfigError)
    if cfg is not None:  # whatever the reader accepts, an artifact's manifest can hold
        assert GemmaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    return cfg


def test_fuzz_bases_are_valid() -> None:
    assert all(isinstance(hf_config_from_dict(d), GemmaConfig) for d in CONFIGS)


@FUZZ
@given(mutated(CONFIGS, CONFIG_KEYS))
def test_fuzz_mutated_configs(d: dict[str, Any]) -> None:
    _read_config(d)


# per key: the values the valid configs hold (a random config is mostly plausible, so the reader
# gets past the first missing field), or any JSON
_SEEN = {k: st.sampled_from([d[k] for d in CONFIGS if k in d] or [None]) | JSON for k in CONFIG_KEYS}


_ALWAYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@FUZZ
@given(st.fixed_dictionaries({k: _SEEN[k] for k in _ALWAYS},
                             optional={k: _SEEN[k] for k in CONFIG_KEYS if k not in _ALWAYS}))
def test_fuzz_random_configs(d: dict[str, Any]) -> None:
    _read_config(d)


@st.composite
def _damaged_text(draw: st.DrawFn) -> bytes:
    """A valid config.json with bytes overwritten, inserted or cut, or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    blob = bytearray(json.dumps(draw(st.sampled_from(CONFIGS))).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(blob)))
        op = draw(st.sampled_from(["set", "insert", "cut"]))
        if op == "cut":
            del blob[at:]
        elif op == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(blob):
            blob[at] = draw(st.integers(0, 255))
    return bytes(blob)


@FUZZ
@given(_damaged_text())
def test_fuzz_config_bytes(scratch: Callable[[str], Path], text: bytes) -> None:
    path = scratch(".json")
    path.write_bytes(text)
    _fails_cleanly(lambda: read_hf_config(path), ConfigError)


@FUZZ
@given(mutated([hf_config_from_dict(d).to_dict() for d in CONFIGS[:4]]))
def test_fuzz_manifest_configs(d: dict[str, Any]) -> None:
    """`GemmaConfig.from_dict` reads an artifact's manifest: any damage is a ConfigError."""
    _fails_cleanly(lambda: GemmaConfig.from_dict(d, source="fuzz/manifest.json"), ConfigError)


# ---- (b) safetensors headers ----------------------------------------------------------------------

_TENSORS = {  # name -> (dtype, shape): 8 x 4 f32, 4 bf16, 2 x 2 f16
    "model.embed_tokens.weight": ("F32", [8, 4]), "model.norm.weight": ("BF16", [4]),
    "model.layers.0.self_attn.q_proj.weight": ("F16", [2, 2]),
}


def _valid_header() -> tuple[dict[str, Any], bytes]:
    header, offset = {}, 0
    for name, (dtype, shape) in _TENSORS.items():
        size = int(np.prod(shape)) * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, bytes(range(offset))


HEADER, DATA = _valid_header()


def _pack(header: Any, *, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + DATA


_ENTRY_VALUES = {
    "dtype": st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=4),
    "shape": st.lists(st.integers(0, 10), max_size=3),
    "data_offsets": st.lists(st.integers(0, len(DATA) + 8), min_size=2, max_size=2),
}


@st.composite
def _headers(draw: st.DrawFn) -> bytes:
    """Safetensors bytes: the valid header mutated (plausible or random values), a header that
    lies about its length, a valid file truncated or with bytes flipped, or random bytes."""
    kind = draw(st.sampled_from(["entry", "mutated", "length", "truncated", "flipped", "random"]))
    if kind == "entry":
        header = copy.deepcopy(HEADER)
        for _ in range(draw(st.integers(1, 3))):
            entry = header[draw(st.sampled_from(sorted(header)))]
            field = draw(st.sampled_from(sorted(_ENTRY_VALUES)))
            entry[field] = draw(_ENTRY_VALUES[field])
        return _pack(header)
    if kind == "mutated":
        return _pack(draw(mutated([HEADER])))
    if kind == "length":
        return _pack(HEADER, length=draw(st.integers(0, 2 ** 64 - 1) | st.integers(0, 400)))
    valid = bytearray(_pack(HEADER))
    if kind == "truncated":
        return bytes(valid[:draw(st.integers(0, len(valid) - 1))])
    if kind == "flipped":
        for at in draw(st.lists(st.integers(0, len(valid) - len(DATA) - 1), min_size=1, max_size=4)):
            valid[at] = draw(st.integers(0, 255))
        return bytes(valid)
    return draw(st.binary(max_size=200))


TINY_CONFIG = hf_config_from_dict({"model_type": "gemma2", "hidden_size": 4, "intermediate_size": 8,
                                   "num_attention_heads": 1, "num_key_value_heads": 1, "num_hidden_layers": 1,
                                   "vocab_size": 8, "head_dim": 4})


@FUZZ
@given(_headers())
def test_fuzz_safetensors_headers(scratch: Callable[[str], Path], blob: bytes) -> None:
    parsed = _fails_cleanly(lambda: read_header(io.BytesIO(blob)), ValueError)
    path = scratch(".safetensors")
    path.write_bytes(blob)
    store = _fails_cleanly(lambda: WeightStore.open(path, TINY_CONFIG), WeightError)
    assert (store is None) == (parsed is None)  # the store refuses exactly what read_header refuses
    for name in store.names() if store is not None else ():
        array = _fails_cleanly(lambda name=name: store.get(name), WeightError)  # e.g. F8 data rlx cannot read
        assert array is None or array.shape == store.shape(name)
    path.unlink()


# ---- (c) GGUF -----------------------------------------------------------------------------------

_ARCHS = ["gemma", "gemma2", "gemma3", "gemma4", "llama"]
_EXTRA_KEYS = ["rope.freq_base_swa", "attention.sliding_window_pattern", "rope.scaling.type", "rope.scaling.factor",
               "attention.scale", "final_logit_softcapping", "attn_logit_softcapping", "attention.key_length_swa",
               "attention.shared_kv_layers", "expert_count", "expert_used_count", "expert_feed_forward_length",
               "embedding_length_per_layer_input", "general.alignment"]
_INT32 = st.integers(-2 ** 31, 2 ** 31 - 1)
GGUF_VALUES = st.one_of(  # (value, type) pairs GGUFWriter can write (no empty arrays)
    st.tuples(st.text(max_size=8), st.just(T.STRING)),
    st.tuples(st.integers(0, 2 ** 32 - 1) | st.integers(0, 70), st.just(T.UINT32)),
    st.tuples(_INT32, st.just(T.INT32)),
    st.tuples(st.integers(0, 2 ** 64 - 1), st.just(T.UINT64)),
    st.tuples(st.floats(width=32), st.just(T.FLOAT32)),
    st.tuples(st.floats(), st.just(T.FLOAT64)),
    st.tuples(st.booleans(), st.just(T.BOOL)),
    st.tuples(st.lists(_INT32 | st.integers(0, 8), min_size=1, max_size=4), st.just(T.ARRAY)),
    st.tuples(st.lists(st.text(max_size=4), min_size=1, max_size=4), st.just(T.ARRAY)),
    st.tuples(st.lists(st.booleans(), min_size=1, max_size=4), st.just(T.ARRAY)),
    st.tuples(st.lists(st.floats(width=32), min_size=1, max_size=4), st.just(T.ARRAY)),
)
_EMBEDDINGS = st.sampled_from([(32, 64), (8, 64), (64,), (32, 64, 1), (1, 1)])


@st.composite
def _gguf_metadata(draw: st.DrawFn) -> tuple[str, dict[str, tuple[Any, gguf.GGUFValueType]], dict[str, np.ndarray]]:
    """(architecture, metadata, tensors): the minimal Gemma 3 GGUF with keys dropped or retyped,
    another architecture's prefix, the embedding dropped or misshaped."""
    arch = draw(st.sampled_from(_ARCHS))
    meta = {k.replace("gemma3.", f"{arch}.", 1): v for k, v in MINIMAL_GEMMA3.items()}
    keys = sorted(meta) + [f"{arch}.{k}" if not k.startswith("general.") else k for k in _EXTRA_KEYS]
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(GGUF_VALUES)
    tensors = {}
    if draw(st.integers(0, 4)):  # mostly keep an embedding, sometimes of the wrong rank or size
        tensors["token_embd.weight"] = np.zeros(draw(_EMBEDDINGS), np.float32)
    return arch, meta, tensors


@FUZZ
@given(_gguf_metadata())
def test_fuzz_gguf_metadata(scratch: Callable[[str], Path], case: tuple[str, dict, dict]) -> None:
    arch, meta, tensors = case
    path = write_gguf(scratch(".gguf"), meta, tensors, arch=arch)
    _fails_cleanly(lambda: open_checkpoint(path), RlxError)
    path.unlink()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_ckpt: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int]:
    """A realistic tiny Gemma 3 GGUF's bytes (one tensor Q8_0, so rows are blocks), where its tensor
    table starts and where its header ends."""
    path = write_gguf_from_hf(tiny_ckpt("gemma3"), tmp_path_factory.mktemp("gguf") / "tiny.gguf",
                              quantize={"layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0})
    blob, tensors = path.read_bytes(), GGUFFile.open(path).tensors
    first = next(iter(tensors))  # the table lists tensors in file order
    return blob, blob.index(struct.pack("<Q", len(first)) + first.encode()), min(t.offset for t in tensors.values())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_gguf_bytes(scratch: Callable[[str], Path], tiny_gguf: tuple[bytes, int, int],
                         data: st.DataObject) -> None:
    """A valid GGUF truncated, or with header bytes overwritten (anywhere, or in the tensor table:
    type ids, dims, offsets): an RlxError, or a model whose every tensor reads or is a WeightError."""
    valid, table_start, header_end = tiny_gguf
    blob = bytearray(valid)
    if data.draw(st.integers(0, 3)) == 0:
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    else:
        start = data.draw(st.sampled_from([0, table_start]))
        for at in data.draw(st.lists(st.integers(start, header_end - 1), min_size=1, max_size=6)):
            width = data.draw(st.sampled_from([1, 4, 8]))
            blob[at:at + width] = data.draw(st.binary(min_size=width, max_size=width))
    path = scratch(".gguf")
    path.write_bytes(bytes(blob))
    ckpt = _fails_cleanly(lambda: open_checkpoint(path), RlxError)
    for name in ckpt.weights.names() if ckpt is not None else ():
        _fails_cleanly(lambda name=name: ckpt.weights.get(name), WeightError)
    path.unlink()
