"""The OpenAI-compatible HTTP API (FastAPI) over a `Backend`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` as
server-sent events ending in `data: [DONE]`), POST /tokenize, POST /detokenize, GET /health
(503 while the model loads or the server drains, 200 when ready), GET /metrics (Prometheus).

Each choice of a request is one engine request (`n` choices: n requests with the same prompt,
whose pages the prefix cache shares, seeds seed+i). The engine's events become text through
`TextStream` (incremental detokenization, stop strings held back and never emitted); a stop
string cancels the engine request at once. A client that goes away cancels its requests: a
streaming response is cancelled by Starlette when the client disconnects (the engine stream
then cancels its request), a non-streaming one by a watcher of the connection.

Every failure is an OpenAI-shaped error body: 400 for the request (protocol.py), 401 without the
API key, 404 for another model name, 503 with Retry-After while loading, draining or when the
engine's queue is full. One ASGI middleware does the API-key check, the draining refusal and the
access log (one JSON line per request, streamed ones logged when their last byte is sent).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlx.runtime.async_engine import RequestStream, ShuttingDown
from rlx.runtime.requests import RequestError, SamplingParams, TokenEvent
from rlx.runtime.scheduler import QueueFull
from rlx.serve.backend import Backend
from rlx.serve.chat_template import TemplateError
from rlx.serve.metrics import CONTENT_TYPE, Metrics, RequestClock, access_log
from rlx.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    max_new_tokens,
    parse_body,
    sampling_params,
)
from rlx.serve.text import TextStream

log = logging.getLogger("rlx.serve")
MAX_CHOICES = 16          # prompts x n in one request
RETRY_AFTER_S = "1"


@dataclass
class ServerState:
    """What the routes share; `backend` is None while the model loads."""

    metrics: Metrics
    served_name: str | None = None
    api_key: str | None = None
    backend: Backend | None = None
    load_error: str | None = None
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> Backend:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": RETRY_AFTER_S})
        if self.backend is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, code="loading", headers={"Retry-After": RETRY_AFTER_S})
        return self.backend

    def stats(self) -> dict[str, float]:
        return self.backend.stats() if self.backend is not None else {}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# -- one choice: engine events -> text, tokens, logprobs ---------------------------------------------

@dataclass
class Choice:
    index: int
    stream: RequestStream
    text: TextStream
    clock: RequestClock
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def apply(self, event: TokenEvent) -> str:
        """Take one engine event; the text it releases."""
        delta = ""
        if event.token is not None:
            self.clock.token(event.queued_s)
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append((event.token, event.logprob, event.top_logprobs))
            if not (event.finish_reason == "stop" and event.token in self.eos_ids):
                delta, stopped = self.text.push(event.token)
                if stopped:  # a stop string: the engine request ends now
                    self.stream.cancel()
                    self.finish_reason = "stop"
        if event.finished and self.finish_reason is None:
            self.finish_reason = event.finish_reason
            self.error = event.error
            delta += self.text.finish()
        if self.finish_reason is not None:
            self.clock.finish(self.finish_reason)
        return delta

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


async def _events(choices: Sequence[Choice]) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """Every choice's events as they come (choices interleaved), until each has finished."""
    queue: asyncio.Queue[tuple[Choice, TokenEvent | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for event in choice.stream:
                await queue.put((choice, event))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        while not all(c.done for c in choices):
            choice, event = await queue.get()
            if event is None:
                if not choice.done:  # its stream ended without a final event: it was cancelled
                    choice.finish_reason = "cancelled"
            elif not choice.done:
                yield choice, event
    finally:
        for choice in choices:
            choice.stream.cancel()
        for task in tasks:
            task.cancel()


def _top(backend: Backend, pairs: Sequence[tuple[int, float]]) -> list[tuple[str, float]]:
    return [(backend.token_text(t), lp) for t, lp in pairs]


def _chat_logprobs(backend: Backend, entries: Sequence[tuple[int, float, tuple[tuple[int, float], ...]]],
                   top: int) -> dict[str, Any]:
    def item(token: int, lp: float) -> dict[str, Any]:
        text = backend.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in tops[:top]]}
                        for t, lp, tops in entries]}


def _completion_logprobs(backend: Backend, entries: Sequence[tuple[int, float, tuple[tuple[int, float], ...]]],
                         top: int, offset: int) -> dict[str, Any]:
    tokens = [backend.token_text(t) for t, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(_top(backend, tops[:top])) if top else None for _, _, tops in entries],
            "text_offset": offsets}


# -- the app ----------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """A validated request: what to submit for each choice."""

    prompts: list[list[int]]
    params: list[SamplingParams]        # one per choice, choice i = prompt i // n
    grammar: Any
    stops: list[str]
    n: int


class Service:
    """The request handlers, over one `ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _check_model(self, backend: Backend, requested: str | None) -> None:
        if requested is not None and requested != backend.name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {backend.name!r}",
                           "model", "model_not_found")

    async def _plan(self, backend: Backend, request: CompletionRequest | ChatRequest,
                    prompts: list[list[int]], logprobs: int | None) -> _Plan:
        stops = request.stop_strings()
        if len(prompts) * request.n > MAX_CHOICES:
            raise bad_request(f"{len(prompts)} prompts x n={request.n} is more than {MAX_CHOICES} choices", "n")
        params: list[SamplingParams] = []
        for ids in prompts:
            limit = max_new_tokens(request, len(ids), backend.max_seq)
            params += [sampling_params(request, max_new_tokens=limit, logprobs=logprobs, vocab_size=backend.vocab_size,
                                       index=i) for i in range(request.n)]
        grammar = None
        if request.response_format is not None:
            try:
                grammar = await asyncio.to_thread(backend.grammars.compile, request.response_format.as_dict())
            except RequestError as err:
                raise bad_request(err.message, err.param) from None
        return _Plan(prompts, params, grammar, stops, request.n)

    def _submit(self, backend: Backend, plan: _Plan, request_id: str) -> list[Choice]:
        """One engine request per choice; all or none (a refusal cancels those already queued)."""
        choices: list[Choice] = []
        try:
            for i, params in enumerate(plan.params):
                ids = plan.prompts[i // plan.n]
                constraint = backend.grammars.constraint(plan.grammar) if plan.grammar is not None else None
                clock = RequestClock(self.state.metrics)
                stream = backend.engine.submit(ids, params, constraint=constraint, request_id=f"{request_id}-{i}")
                self.state.metrics.prompt_tokens.inc(len(ids))
                choices.append(Choice(i, stream, TextStream(backend.decode, plan.stops), clock,
                                      frozenset(backend.eos_ids)))
        except BaseException as err:
            for choice in choices:
                choice.stream.cancel()
            if isinstance(err, QueueFull):
                raise APIError(503, f"the server is busy: {err.message}", code="queue_full",
                               headers={"Retry-After": RETRY_AFTER_S}) from None
            if isinstance(err, ShuttingDown):
                raise APIError(503, err.message, code="shutting_down", headers={"Retry-After": RETRY_AFTER_S}) \
                    from None
            if isinstance(err, RequestError):
                raise bad_request(err.message, err.param) from None
            raise
        return choices

    async def completions(self, http: Request) -> Response:
        backend = self.state.ready()
        request: CompletionRequest = parse_body(await http.body(), CompletionRequest)
        self._check_model(backend, request.model)
        prompts = self._prompts(backend, request.prompt)
        plan = await self._plan(backend, request, prompts, request.logprobs)
        return await self._respond(http, backend, request, plan, "cmpl", request.logprobs or 0)

    async def chat(self, http: Request) -> Response:
        backend = self.state.ready()
        request: ChatRequest = parse_body(await http.body(), ChatRequest)
        self._check_model(backend, request.model)
        try:
            ids = backend.encode_chat([m.as_template_message() for m in request.messages],
                                      add_generation_prompt=request.add_generation_prompt)
        except TemplateError as err:
            raise bad_request(err.message, "messages") from None
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        plan = await self._plan(backend, request, [ids], logprobs)
        return await self._respond(http, backend, request, plan, "chatcmpl", request.top_logprobs or 0)

    @staticmethod
    def _prompts(backend: Backend, prompt: Any) -> list[list[int]]:
        """A completion's prompt(s): a string, a list of ids, or a list of either."""
        if isinstance(prompt, str):
            return [backend.tokenizer.encode(prompt)]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [backend.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    async def _respond(self, http: Request, backend: Backend, request: CompletionRequest | ChatRequest,
                       plan: _Plan, kind: str, top: int) -> Response:
        request_id = f"{kind}-{uuid.uuid4().hex[:24]}"
        choices = self._submit(backend, plan, request_id)
        http.scope.setdefault("state", {})["access"] = {"request_id": request_id,
                                                         "prompt_tokens": sum(map(len, plan.prompts))}
        chat = isinstance(request, ChatRequest)
        head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": backend.name}
        if request.stream:
            return StreamingResponse(self._sse(http, backend, request, plan, choices, head, top),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await _until_disconnected(http, self._complete(backend, request, plan, choices, head, top),
                                             choices)
        finally:
            self._log_finish(http, plan, choices)
        return JSONResponse(body)

    def _usage(self, plan: _Plan, choices: Sequence[Choice]) -> dict[str, int]:
        prompt = sum(map(len, plan.prompts))
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _log_finish(self, http: Request, plan: _Plan, choices: Sequence[Choice]) -> None:
        entry = http.scope.setdefault("state", {}).setdefault("access", {})
        entry.update(completion_tokens=sum(len(c.tokens) for c in choices),
                     finish=",".join(str(c.finish_reason) for c in choices),
                     ttft_ms=_ms(choices[0].clock.ttft_s) if choices else None)

    async def _complete(self, backend: Backend, request: CompletionRequest | ChatRequest, plan: _Plan,
                        choices: list[Choice], head: dict[str, Any], top: int) -> dict[str, Any]:
        async for choice, event in _events(choices):
            choice.apply(event)
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", code="engine_error")
        chat = isinstance(request, ChatRequest)
        out = []
        for c in choices:
            entry: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason}
            if chat:
                entry["message"] = {"role": "assistant", "content": c.text.text}
                entry["logprobs"] = _chat_logprobs(backend, c.logprobs, top) if request.logprobs else None
            else:
                entry["text"] = c.text.text
                entry["logprobs"] = (_completion_logprobs(backend, c.logprobs, top, 0)
                                     if request.logprobs is not None else None)
            if request.return_token_ids:
                entry["token_ids"] = c.tokens
            out.append(entry)
        return {**head, "choices": out, "usage": self._usage(plan, choices)}

    async def _sse(self, http: Request, backend: Backend, request: CompletionRequest | ChatRequest, plan: _Plan,
                   choices: list[Choice], head: dict[str, Any], top: int) -> AsyncIterator[str]:
        chat = isinstance(request, ChatRequest)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage = request.include_usage()

        def chunk(parts: list[dict[str, Any]]) -> str:
            return f"data: {json.dumps({**head, 'choices': parts, **({'usage': None} if usage else {})})}\n\n"

        try:
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in choices])
            offsets = dict.fromkeys(range(len(choices)), 0)
            async for choice, event in _events(choices):
                seen = len(choice.logprobs)
                delta = choice.apply(event)
                if choice.finish_reason == "error":
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {choice.error}').body())}\n\n"
                    break
                new_logprobs = choice.logprobs[seen:]
                if not delta and not choice.done and not new_logprobs and not request.return_token_ids:
                    continue
                part: dict[str, Any] = {"index": choice.index}
                if chat:
                    part["delta"] = {"content": delta} if delta else {}
                    part["logprobs"] = _chat_logprobs(backend, new_logprobs, top) if request.logprobs else None
                else:
                    part["text"] = delta
                    part["logprobs"] = (_completion_logprobs(backend, new_logprobs, top, offsets[choice.index])
                                        if request.logprobs is not None else None)
                    offsets[choice.index] += len(delta)
                part["finish_reason"] = choice.finish_reason if choice.done else None
                if request.return_token_ids:
                    part["token_ids"] = [event.token] if event.token is not None else []
                yield chunk([part])
            if usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self._usage(plan, choices)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:
                c.stream.cancel()
            self._log_finish(http, plan, choices)

    async def tokenize(self, http: Request) -> Response:
        backend = self.state.ready()
        body = _json_object(await http.body())
        self._check_model(backend, body.get("model"))
        if "messages" in body:
            try:
                request = ChatRequest.model_validate({"messages": body["messages"]})
                ids = backend.encode_chat([m.as_template_message() for m in request.messages],
                                          add_generation_prompt=bool(body.get("add_generation_prompt", True)))
            except TemplateError as err:
                raise bad_request(err.message, "messages") from None
            except ValueError as err:
                raise bad_request(f"messages: {err}", "messages") from None
        elif isinstance(body.get("prompt"), str):
            ids = backend.tokenizer.encode(body["prompt"], add_bos=bool(body.get("add_special_tokens", True)))
        else:
            raise bad_request("give prompt (a string) or messages", "prompt")
        return JSONResponse({"count": len(ids), "max_model_len": backend.max_seq, "tokens": ids})

    async def detokenize(self, http: Request) -> Response:
        backend = self.state.ready()
        body = _json_object(await http.body())
        self._check_model(backend, body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < backend.vocab_size for t in tokens):
            raise bad_request(f"tokens must be a list of token ids in 0..{backend.vocab_size - 1}", "tokens")
        return JSONResponse({"prompt": backend.tokenizer.decode(tokens)})

    async def models(self, http: Request) -> Response:
        backend = self.state.ready()
        return JSONResponse({"object": "list", "data": [
            {"id": backend.name, "object": "model", "created": self.state.started, "owned_by": "rlx",
             "root": backend.name, "max_model_len": backend.max_seq}]})


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return data


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def _until_disconnected(http: Request, work: Awaitable[dict[str, Any]], choices: Sequence[Choice]) \
        -> dict[str, Any]:
    """Await `work`, cancelling it (and so its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            message = await http.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()
        for c in choices:
            c.stream.cancel()


class ServeMiddleware:
    """API key, draining refusal and the access log, in front of every route (pure ASGI, so
    streamed bodies pass through untouched and their end is seen)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]
        path = scope["path"]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            if path != "/metrics" and path != "/health":
                access_log(method=scope["method"], path=path, status=status[0],
                           ms=_ms(time.perf_counter() - start), **scope.get("state", {}).get("access", {}))

    def _refusal(self, scope: Scope) -> APIError | None:
        path = scope["path"]
        if self.state.api_key is not None and path != "/health" and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.state.api_key}".encode()):
                return APIError(401, "a valid API key is needed: send Authorization: Bearer KEY",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if self.state.draining:
            return APIError(503, "the server is shutting down", code="shutting_down",
                            headers={"Retry-After": RETRY_AFTER_S})
        return None


def create_app(state: ServerState, *, allowed_origins: Sequence[str] = (),
               load: Callable[[], Backend] | None = None, grace_s: float = 30.0) -> FastAPI:
    """The app over `state`; `load` (run in a thread at startup) fills `state.backend`, during
    which /health answers 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, load)) if load is not None else None
        yield
        state.draining = True
        if loading is not None and not loading.done():
            loading.cancel()
        if state.backend is not None:
            await state.backend.engine.shutdown(grace_s)

    app = FastAPI(title="rlx", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    service = Service(state)

    routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("GET", "/v1/models"): service.models,
        ("POST", "/v1/completions"): service.completions,
        ("POST", "/v1/chat/completions"): service.chat,
        ("POST", "/tokenize"): service.tokenize,
        ("POST", "/detokenize"): service.detokenize,
    }
    for (method, path), handler in routes.items():
        app.add_api_route(path, _guarded(handler), methods=[method])

    @app.get("/health")
    async def health() -> Response:
        try:
            state.ready()
        except APIError as err:
            return _error_response(err)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        return _error_response(bad_request(str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        return _error_response(APIError(err.status_code, str(err.detail), code=None))

    app.add_middleware(ServeMiddleware, state=state)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    return app


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """APIError -> its response; anything else -> a logged, OpenAI-shaped 500 (a bug)."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as err:
            return _error_response(err)
        except Exception as err:
            log.exception("unhandled error in %s", request.url.path)
            return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err}"))

    return route


async def _load(state: ServerState, load: Callable[[], Backend]) -> None:
    try:
        state.backend = await asyncio.to_thread(load)
        log.info("model %s ready", state.backend.name)
    except Exception as err:  # reported by whoever started the server (`rlx serve` exits with it)
        state.load_error = str(err)

