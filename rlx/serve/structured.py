"""Structured output (`response_format` json_object / json_schema) through xgrammar.

The grammar is compiled once per request against the model's vocabulary (`TokenizerInfo` built
from the tokenizer's own pieces and decoder, so byte-fallback pieces are read as the bytes they
decode to), and each sequence gets its own `GrammarMatcher`, which the engine's sampler asks for
the allowed-token mask before every token (`TokenConstraint`). Once the JSON value is complete the
mask allows only the end-of-sequence ids, so the output always parses, whatever the model prefers.
xgrammar is an optional extra (`pip install 'rlx[structured]'`): it requires torch, transformers
and triton, gigabytes a CPU server has no other use for. It is imported on the first structured
request (seconds); without it such a request is a 400 naming the extra, and every other request
is served as usual.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlx.runtime.requests import RequestError

STRUCTURED_EXTRA = "pip install 'rlx[structured]'"


def available() -> bool:
    """Whether structured output can be served here (xgrammar installed), without importing it."""
    return importlib.util.find_spec("xgrammar") is not None


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RequestError("response_format json_object / json_schema needs xgrammar, which is not installed "
                           "where this server runs", param="response_format",
                           hint=f"{STRUCTURED_EXTRA} and restart the server, or send "
                                'response_format {"type": "text"}') from None
    return xgrammar


class GrammarConstraint:
    """One sequence's matcher: a `rlx.runtime.requests.TokenConstraint`."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self._matcher = import_xgrammar().GrammarMatcher(compiled)
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self.vocab_size = vocab_size

    def allowed(self, vocab_size: int) -> np.ndarray | None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:vocab_size]
        return bits.astype(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(int(token)):
            raise RuntimeError(f"token {token} was sampled outside the grammar's mask")

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarFactory:
    """The model's `GrammarCompiler` (built on first use) and per-request compilation."""

    def __init__(self, pieces: Sequence[str], backend_json: str, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._pieces = list(pieces)
        self._backend_json = backend_json
        self.vocab_size = vocab_size
        self._eos_ids = [int(e) for e in eos_ids]
        self._compiler: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> GrammarFactory:
        """From an `rlx.runtime.tokenizer.Tokenizer` (its `tokenizers` backend)."""
        backend = tokenizer.backend
        size = backend.get_vocab_size(with_added_tokens=True)
        pieces = [backend.id_to_token(i) or "" for i in range(size)]
        return cls(pieces, backend.to_str(), vocab_size, tokenizer.eos_ids)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = import_xgrammar()

                try:
                    meta = xgr.TokenizerInfo._detect_metadata_from_hf(self._backend_json)
                    vocab_type, prefix_space = meta["vocab_type"], meta["add_prefix_space"]
                except Exception:  # a backend the detector cannot read: the pieces decide
                    vocab_type = xgr.VocabType.BYTE_FALLBACK if "<0x0A>" in self._pieces else xgr.VocabType.RAW
                    prefix_space = False
                vocab = (self._pieces + [""] * self.vocab_size)[: self.vocab_size]
                info = xgr.TokenizerInfo(vocab, vocab_type, vocab_size=self.vocab_size,
                                         stop_token_ids=self._eos_ids or None, add_prefix_space=prefix_space)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, response_format: Mapping[str, Any]) -> Any | None:
        """The compiled grammar for an OpenAI `response_format`, None for plain text; an invalid
        schema raises `RequestError` (param "response_format")."""
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        compiler = self._get_compiler()
        if kind == "json_object":  # OpenAI's json mode is an object (xgrammar's builtin JSON is any value)
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object",
                               param="response_format", hint='{"type": "json_schema", "json_schema": '
                                                         '{"name": "x", "schema": {"type": "object", ...}}}')
        check_schema(schema)
        try:
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                strict_mode=bool(spec.get("strict", True)))
        except Exception as err:  # xgrammar raises RuntimeError / ValueError / InvalidJSONError
            raise RequestError(f"response_format.json_schema.schema cannot be compiled: {err}",
                               param="response_format", hint="check the schema is valid JSON Schema") from None

    def constraint(self, compiled: Any) -> GrammarConstraint:
        return GrammarConstraint(compiled, self.vocab_size)


def check_schema(schema: Mapping[str, Any]) -> None:
    """Validate the schema against its metaschema (jsonschema, where installed): xgrammar
    ignores some invalid keywords silently, and a wrong schema should be a 400, not odd output."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise RequestError(f"response_format.json_schema.schema is not a valid JSON schema: {err.message}",
                           param="response_format", hint="check the schema is valid JSON Schema") from None
