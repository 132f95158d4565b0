"""Request validation: every bad field is a 400 naming it, in OpenAI's error shape; good ones map
onto SamplingParams as OpenAI defines them."""

from __future__ import annotations

import json

import pytest

from rlx.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    max_new_tokens,
    parse_body,
    sampling_params,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _parse(body: dict | str | bytes, model: type = CompletionRequest):
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return parse_body(raw, model)


def _params(body: dict, model: type = CompletionRequest, **kw):
    request = _parse(body, model)
    return sampling_params(request, max_new_tokens=kw.pop("max_new", 4), logprobs=None, vocab_size=256, **kw)


@pytest.mark.parametrize(("raw", "code"), [
    (b"{", "invalid_json"), (b"", "invalid_json"), (b"[1, 2]", "invalid_json"), (b"\xff\xfe", "invalid_json"),
    (b'"text"', "invalid_json"), (b"null", "invalid_json"),
])
def test_malformed_bodies_are_400(raw: bytes, code: str) -> None:
    with pytest.raises(APIError) as err:
        parse_body(raw, CompletionRequest)
    assert err.value.status == 400 and err.value.code == code
    body = err.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),          # strict: no string -> int coercion
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options"),
])
def test_bad_fields_name_their_param(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        request = _parse(body)
        request.stop_strings()
    assert err.value.status == 400 and err.value.param == param, err.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_fields(body: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        _parse(body, ChatRequest)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_p": 7}, "top_p"), ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"min_p": 2}, "min_p"), ({"seed": -1}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {"999": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
])
def test_sampling_values_out_of_range(extra: dict, param: str) -> None:
    with pytest.raises(APIError) as err:
        _params({"prompt": "x", **extra})
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_defaults_and_mapping() -> None:
    p = _params({"prompt": "x"})
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.seed is None  # OpenAI's defaults
    p = _params({"prompt": "x", "temperature": 0, "seed": 7, "logit_bias": {"5": -100}, "top_k": 3}, index=2)
    assert (p.temperature, p.seed, dict(p.logit_bias), p.top_k) == (0, 9, {5: -100}, 3)  # seed + choice index
    assert _parse({"prompt": "x", "stop": "END"}).stop_strings() == ["END"]
    assert _parse({"prompt": "x", "unknown_extra": 1}).prompt == "x"  # unknown fields ignored, as vLLM
    message = _parse({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}]},
                     ChatRequest).messages[0]
    assert message.as_template_message() == {"role": "system", "content": "ab"}


def test_token_budget() -> None:
    completion = _parse({"prompt": "x"})
    assert max_new_tokens(completion, 10, 256) == 16  # OpenAI's completions default
    chat = _parse(CHAT, ChatRequest)
    assert max_new_tokens(chat, 10, 256) == 246  # chat: the rest of the context
    assert max_new_tokens(_parse({**CHAT, "max_completion_tokens": 5, "max_tokens": 9}, ChatRequest), 10, 256) == 5
    for body, model, prompt_len, param in [
        ({"prompt": "x", "max_tokens": 0}, CompletionRequest, 10, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, CompletionRequest, 10, "max_tokens"),
        ({"prompt": "x", "max_tokens": 250}, CompletionRequest, 10, "max_tokens"),
        ({"prompt": "x"}, CompletionRequest, 256, "prompt"),
        ({**CHAT, "max_completion_tokens": 0}, ChatRequest, 10, "max_completion_tokens"),
        (CHAT, ChatRequest, 300, "messages"),
    ]:
        with pytest.raises(APIError) as err:
            max_new_tokens(_parse(body, model), prompt_len, 256)
        assert err.value.status == 400 and err.value.param == param
