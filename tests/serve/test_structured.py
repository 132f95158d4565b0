"""Grammar constraints: random logits under the mask always give JSON that parses and validates
(the model knows nothing: the worst case for a grammar); an invalid schema is a RequestError."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from rlx.runtime.requests import RequestError
from rlx.runtime.tokenizer import Tokenizer
from rlx.serve.structured import GrammarFactory
from tests.serve.conftest import VOCAB, write_char_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> tuple[GrammarFactory, Tokenizer]:
    directory = tmp_path_factory.mktemp("char-tok")
    write_char_tokenizer(Path(directory))
    tok = Tokenizer.from_hf_dir(Path(directory), eos_ids=(1,))
    return GrammarFactory.from_tokenizer(tok, VOCAB), tok


def _random_walk(factory: GrammarFactory, grammar: object, rng: np.random.Generator, limit: int = 400) -> list[int]:
    constraint = factory.constraint(grammar)
    ids: list[int] = []
    while not constraint.is_terminated() and len(ids) < limit:
        mask = constraint.allowed(VOCAB)
        logits = np.where(mask, rng.normal(size=VOCAB) * 3, -np.inf)
        p = np.exp(logits - logits.max())
        token = int(rng.choice(VOCAB, p=p / p.sum()))
        constraint.accept(token)
        ids.append(token)
    return ids


def test_random_logits_under_a_schema_always_validate(factory) -> None:
    grammars, tok = factory
    grammar = grammars.compile({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = _random_walk(grammars, grammar, rng)
        assert ids[-1] == 1, "ends with EOS once the value is complete"
        value = json.loads(tok.decode(ids[:-1], skip_special=True))
        jsonschema.validate(value, SCHEMA)


def test_json_object_mode(factory) -> None:
    grammars, tok = factory
    grammar = grammars.compile({"type": "json_object"})
    rng = np.random.default_rng(1)
    for _ in range(5):
        ids = _random_walk(grammars, grammar, rng, limit=2000)
        if ids[-1] == 1:  # random JSON may nest past the limit; every finished one parses
            assert isinstance(json.loads(tok.decode(ids[:-1], skip_special=True)), dict)


def test_text_format_has_no_grammar(factory) -> None:
    grammars, _ = factory
    assert grammars.compile({"type": "text"}) is None


@pytest.mark.parametrize("spec", [
    {"name": "x", "schema": {"type": "objekt"}},
    {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}},
    {"name": "x"},
    {"name": "x", "schema": []},
])
def test_invalid_schema_is_a_request_error(factory, spec: dict) -> None:
    grammars, _ = factory
    with pytest.raises(RequestError) as err:
        grammars.compile({"type": "json_schema", "json_schema": spec})
    assert err.value.param == "response_format"


def test_a_token_outside_the_mask_is_refused(factory) -> None:
    grammars, _ = factory
    constraint = grammars.constraint(grammars.compile({"type": "json_object"}))
    mask = constraint.allowed(VOCAB)
    assert mask.dtype == bool and mask.shape == (VOCAB,)
    assert not mask[ord("x") - 32 + 8]  # "x" cannot start a JSON object
    with pytest.raises(RuntimeError):
        constraint.accept(ord("x") - 32 + 8)


def test_without_xgrammar_a_structured_request_is_a_400_naming_the_extra(
        factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """xgrammar is the optional `structured` extra (it requires torch, transformers and triton): a
    fresh factory where it cannot be imported refuses json formats with the install hint, and still
    serves plain text."""
    import sys

    from rlx.serve import structured

    grammars, tok = factory
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what `import xgrammar` sees when it is absent
    fresh = GrammarFactory.from_tokenizer(tok, VOCAB)
    assert fresh.compile({"type": "text"}) is None
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}):
        with pytest.raises(RequestError, match="needs xgrammar") as err:
            fresh.compile(fmt)
        assert err.value.param == "response_format" and "rlx[structured]" in str(err.value.hint)
    monkeypatch.setattr(structured.importlib.util, "find_spec", lambda name: None)
    assert not structured.available()
