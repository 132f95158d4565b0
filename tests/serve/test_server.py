"""A real `rlx serve` subprocess on a tiny random Gemma 3 (reference engine), driven by the official
`openai` client: results equal `rlx run`'s engine and transformers' `generate`, whatever runs
beside them; streamed equals non-streamed; every fault is a 4xx / 503 and the server keeps serving;
disconnects cancel, SIGTERM drains."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.serve.conftest import Server

MAX_SEQ = 256


@pytest.fixture(scope="module")
def server(chat_ckpt: Path, serve_factory: Callable[..., Server]) -> Server:
    return serve_factory(chat_ckpt, "--max-batch", "8", "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(chat_ckpt: Path):
    """`rlx run`'s engine in this process: rlx.load(...).generate with rlx run's Sampler."""
    import rlx

    return rlx.load(chat_ckpt)


EXTRA = {"top_k", "min_p", "repetition_penalty", "ignore_eos", "return_token_ids"}  # not in the openai client


def _split(body: dict) -> dict:
    """openai client kwargs: rlx / vLLM extensions go in extra_body."""
    extra = {k: v for k, v in body.items() if k in EXTRA}
    return {**{k: v for k, v in body.items() if k not in EXTRA}, "extra_body": {**extra, "return_token_ids": True}}


def _ids(choice: object) -> list[int]:
    return choice.model_extra["token_ids"]


def _metrics(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


# -- equality ------------------------------------------------------------------------------------

def _settings(i: int) -> dict:
    """16 requests: prompts of 3..33 tokens, 4..19 new tokens, greedy and seeded sampling."""
    rng = random.Random(i)
    prompt = [2, *[rng.randrange(7, 103) for _ in range(3 + 2 * i)]]
    sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.7 + 0.1 * (i % 4), "seed": 100 + i,
                                                         "top_k": [0, 20][i % 3 == 0], "top_p": [1.0, 0.9][i % 5 == 0]}
    return {"prompt": prompt, "max_tokens": 4 + i, **sampling}


def test_16_concurrent_requests_equal_rlx_run_and_each_alone(client: openai.OpenAI, local) -> None:
    from rlx.runtime.sampler import Sampler

    def ask(i: int) -> list[int]:
        r = client.completions.create(model="tiny", **_split(_settings(i)))
        return _ids(r.choices[0])

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    for i, tokens in enumerate(together):
        s = _settings(i)
        sampler = Sampler(s["temperature"], s.get("top_k", 0), s.get("top_p", 1.0), s.get("seed"))
        expected = local.generate(s["prompt"], s["max_tokens"], sampler=sampler, keep_logits=False).tokens
        assert tokens == expected, f"request {i} ({s}) differs from rlx run's engine"
        assert tokens == ask(i), f"request {i} differs from itself alone"


def test_penalties_and_bias_equal_the_request_alone(client: openai.OpenAI) -> None:
    settings = [{"presence_penalty": 1.5}, {"frequency_penalty": 1.0, "repetition_penalty": 1.3},
                {"logit_bias": {"12": 5, "40": -100}, "min_p": 0.1}, {"temperature": 1.2, "seed": 3, "min_p": 0.05}]
    bodies = [{"prompt": [2, 30 + i, 40, 50], "max_tokens": 12, "temperature": 0.0, **s} for i, s in enumerate(settings)]

    def ask(body: dict) -> list[int]:
        return _ids(client.completions.create(model="tiny", **_split(body)).choices[0])

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, bodies * 2))
    assert together[:4] == together[4:] == [ask(b) for b in bodies]


def test_greedy_completion_and_chat_equal_transformers(client: openai.OpenAI, chat_ckpt: Path) -> None:
    import torch
    import transformers

    from tests.fixtures.tiny import load_hf

    hf = load_hf(chat_ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(chat_ckpt)

    def hf_generate(ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=1, pad_token_id=0)
        return out[0, len(ids):].tolist()

    prompt = "the cafe at 10 {a}"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert _ids(r.choices[0]) == hf_generate(tok(prompt)["input_ids"], 24)
    assert r.choices[0].text == tok.decode(_ids(r.choices[0]), skip_special_tokens=True)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "and you?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                       extra_body={"return_token_ids": True})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(ids)
    assert _ids(r.choices[0]) == hf_generate(list(ids), 24)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streamed_equals_non_streamed(client: openai.OpenAI, kind: str) -> None:
    common = {"model": "tiny", "max_tokens": 40, "temperature": 0.9, "seed": 5, "n": 2,
              "extra_body": {"return_token_ids": True}}
    if kind == "completion":
        create, args = client.completions.create, {"prompt": "hello the world", **common}
        text_of = lambda c: c.text  # noqa: E731
    else:
        create, args = client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}], **common}
        text_of = lambda c: c.message.content  # noqa: E731
    full = create(**args)
    texts, ids, reasons = {0: "", 1: ""}, {0: [], 1: []}, {}
    usage = None
    for chunk in create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += (c.text if kind == "completion" else c.delta.content) or ""
            ids[c.index] += c.model_extra.get("token_ids", [])  # none on the role chunk
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    for c in full.choices:
        assert texts[c.index] == text_of(c) and ids[c.index] == _ids(c) and reasons[c.index] == c.finish_reason
    assert _ids(full.choices[0]) != _ids(full.choices[1])  # n choices draw with seed + i
    assert usage == full.usage


def test_stop_strings_are_cut_and_never_emitted(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0)
    text = base.choices[0].text
    assert len(text) >= 6, "the tiny model's greedy text should be long enough to cut"
    stop = text[3:5]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 5 and all(len(t) <= 2 for t in r.choices[0].logprobs.top_logprobs)


def test_json_schema_generations_parse_and_validate(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"], "additionalProperties": False}

    def ask(i: int) -> str:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"person {i}"}], max_tokens=120, temperature=1.0,
            seed=i, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(ask, range(50)))
    for out in outputs:
        jsonschema.validate(json.loads(out), schema)
    assert len(set(outputs)) > 1


def test_tokenize_detokenize_models(server: Server, client: openai.OpenAI) -> None:
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello"}).json()
    assert ids["tokens"][0] == 2 and ids["count"] == 6 and ids["max_model_len"] == MAX_SEQ
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "<bos>hello"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"][:2] == [2, 5]  # <bos><start_of_turn>
    assert [m.id for m in client.models.list().data] == ["tiny"]


# -- faults --------------------------------------------------------------------------------------

FAULTS = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model_not_found"),
    ("/v1/completions", json.dumps({"prompt": list(range(2, 102)) * 3}).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "top_p": 7}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400, None),
    ("/v1/completions", b'{"prompt": [2, 9999]}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "response_format": '
                             b'{"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objekt"}}}}',
     400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "x"}]}', 400, None),
    ("/v1/chat/completions", b"[]", 400, "invalid_json"),
    ("/detokenize", b'{"tokens": [-1]}', 400, None),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), FAULTS)
def test_each_fault_is_answered_and_the_server_keeps_serving(server: Server, client: openai.OpenAI, path: str,
                                                             body: bytes, status: int, code: str | None) -> None:
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def _bad_request(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
    kind = rng.randrange(4)
    if kind == 0:
        return path, bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    values = [None, -1, 0, 1e309 if rng.random() < 0.1 else -7.5, "x", [], {}, [1, "a"], True, 2**70, {"a": [None]}]
    fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
              "logit_bias", "logprobs", "top_logprobs", "response_format", "stream", "stream_options", "tokens",
              "presence_penalty", "repetition_penalty", "model", "max_completion_tokens"]
    body: dict = {"prompt": "x"} if kind == 1 else {"messages": [{"role": "user", "content": "x"}]}
    for _ in range(rng.randint(1, 4)):
        body[rng.choice(fields)] = rng.choice(values)
    text = json.dumps(body)
    return path, (text[: rng.randrange(len(text))] if kind == 3 else text).encode()


def test_200_random_bad_requests_then_health_and_a_completion(server: Server, client: openai.OpenAI) -> None:
    rng = random.Random(0)
    statuses = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(200):
            path, body = _bad_request(rng)
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body, r.text)
            if r.status_code != 200:
                assert "error" in r.json()
        assert http.get("/health").status_code == 200
    assert sum(s >= 400 for s in statuses) > 150
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_disconnect_mid_stream_cancels_the_sequence(server: Server) -> None:
    body = {"prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
    before = _metrics(server)["rlx:generation_tokens_total"]
    with httpx.Client(timeout=60) as http, http.stream("POST", server.base + "/completions", json=body) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert got
        assert _metrics(server)["rlx:num_requests_running"] == 1
    deadline = time.monotonic() + 5
    while _metrics(server)["rlx:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    m = _metrics(server)
    assert m["rlx:num_requests_running"] == 0 and m["rlx:kv_cache_usage_perc"] == 0
    time.sleep(0.3)
    assert _metrics(server)["rlx:generation_tokens_total"] - before < 200, "the sequence ran on"


def test_disconnect_during_a_non_streaming_request_cancels_it(server: Server) -> None:
    body = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    before = _metrics(server)["rlx:generation_tokens_total"]
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(server.base + "/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 5
    while _metrics(server)["rlx:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metrics(server)["rlx:num_requests_running"] == 0
    time.sleep(0.3)
    assert _metrics(server)["rlx:generation_tokens_total"] - before < 240, "the sequence ran on"


def test_access_log_lines(server: Server) -> None:
    lines = [json.loads(line[6:]) for line in server.log().splitlines() if line.startswith("[rlx] {")]
    completions = [entry for entry in lines if entry["path"] == "/v1/completions" and entry["status"] == 200]
    assert completions and all({"ms", "request_id", "prompt_tokens", "completion_tokens", "finish"} <= set(entry)
                               for entry in completions)


# -- servers of their own ------------------------------------------------------------------------

def test_api_key_and_full_queue(chat_ckpt: Path, serve_factory: Callable[..., Server]) -> None:
    server = serve_factory(chat_ckpt, "--max-batch", "1", "--max-queue", "1", "--allowed-origins",
                           "http://app.example", env={"RLX_API_KEY": "sekrit"})
    assert httpx.get(server.url + "/health").status_code == 200
    preflight = httpx.options(server.base + "/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # CORS preflight needs no key
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(server.base + "/completions", headers={"Origin": "http://evil.example",
                                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    for path in ["/v1/models", "/metrics"]:
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.base + "/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base, api_key="wrong", max_retries=0).models.list()
    auth = {"Authorization": "Bearer sekrit"}
    long = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True}  # ~1 s each: 1 runs, 1 waits, the rest 503

    def ask(_: int) -> httpx.Response:
        return httpx.post(server.base + "/completions", json=long, headers=auth, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    busy = [r for r in answers if r.status_code == 503]
    assert busy and all(r.status_code == 200 for r in answers if r not in busy)
    assert all(r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full" for r in busy)
    r = httpx.post(server.base + "/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth, timeout=60)
    assert r.status_code == 200


def test_sigterm_finishes_streaming_requests_and_exits_0(chat_ckpt: Path, serve_factory: Callable[..., Server]) -> None:
    server = serve_factory(chat_ckpt, "--max-batch", "8")
    results: dict[int, tuple[int, str | None]] = {}
    started = threading.Barrier(9)

    def stream(i: int) -> None:
        body = {"prompt": [2, 10 + i, 20], "max_tokens": 40, "stream": True, "ignore_eos": True, "temperature": 0,
                "return_token_ids": True}
        tokens, reason = 0, None
        with httpx.stream("POST", server.base + "/completions", json=body, timeout=120) as r:
            first = True
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                tokens += len(choice["token_ids"])
                reason = choice["finish_reason"] or reason
                if first:
                    first = False
                    started.wait(60)
        results[i] = (tokens, reason)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.HTTPError):  # no longer admitting: the socket is closed
        httpx.post(server.base + "/completions", json={"prompt": "x"}, timeout=5).raise_for_status()
    for t in threads:
        t.join(120)
    assert results == {i: (40, "length") for i in range(8)}
    assert server.proc.wait(60) == 0, server.log()


def test_compiled_cpu_server_equals_rlx_run(chat_ckpt: Path, serve_factory: Callable[..., Server], local,
                                            tmp_path: Path) -> None:
    """`rlx serve CHECKPOINT --target cpu` compiles through the compile cache (progress shown) and
    serves the compiled paged engine: the same 16 concurrent requests give rlx run's tokens."""
    from rlx.runtime.sampler import Sampler

    server = serve_factory(chat_ckpt, "--target", "cpu", "--served-model-name", "tiny",
                           env={"RLX_CACHE_DIR": str(tmp_path / "cache")})
    assert "compiling" in server.log()
    client = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)

    def ask(i: int) -> list[int]:
        return _ids(client.completions.create(model="tiny", **_split(_settings(i))).choices[0])

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    for i, tokens in enumerate(together):
        s = _settings(i)
        sampler = Sampler(s["temperature"], s.get("top_k", 0), s.get("top_p", 1.0), s.get("seed"))
        assert tokens == local.generate(s["prompt"], s["max_tokens"], sampler=sampler, keep_logits=False).tokens, i
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=20, temperature=0, stream=True))
    assert streamed == client.completions.create(model="tiny", prompt="hello", max_tokens=20,
                                                 temperature=0).choices[0].text


def test_serve_load_bench_runs_against_the_server(server: Server, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "load.json"
    bench = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"
    done = subprocess.run([sys.executable, str(bench), "--url", server.url, "--clients", "1,3", "--requests", "6",
                           "--max-tokens", "8", "--max-prompt-words", "12", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["failed"] == 0 and row["output_tokens"] == 6 * 8 and row["ttft_ms"]["p50"] > 0
        assert row["itl_ms"]["p99"] >= row["itl_ms"]["p50"] > 0
