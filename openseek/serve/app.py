"""`openseek serve`: a private, OpenAI-compatible server for reasoning models, with a chat page at `/`.

Private by default: it listens on 127.0.0.1 and refuses any other address without an API key; the key is
checked in constant time on every route but /health; it makes no outbound connection (a `--model` given as a
hub id is downloaded at startup, before serving; a local directory needs no network at all); CORS is off unless
--allowed-origins is given; body size, message count, `n`, `max_tokens` and the number of sequences in flight
are capped. Every error is an OpenAI error envelope. All requests share the one Engine (continuous batching).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openseek.serve.detokenize import IncrementalDecoder, StopMatcher
from openseek.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionTokensDetails,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingParams,
    TextChoice,
    TextCompletion,
    Usage,
    new_id,
    now,
)
from openseek.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning, strip_reasoning

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = {"/health"}


@dataclass
class ServeConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_n: int = 8
    max_sequences: int = 64  # sequences admitted (generating or waiting for a batch slot); beyond it: 429


class APIError(Exception):
    """An error the client caused or must retry; rendered as the OpenAI envelope."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- the gate: host, key and body size, before any route runs ----------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gate:
    """Pure ASGI middleware in front of every route, so no routing quirk can skip it.

    - Without an API key the server is loopback-only: requests whose Host is not a loopback name are refused,
      which stops DNS-rebinding pages from talking to it through the browser.
    - With a key, every path but /health needs `Authorization: Bearer KEY` (or HTTP Basic with the key as
      password, which lets a browser open the chat page), compared in constant time.
    - Bodies over the limit get 413, whether or not they declare a Content-Length.
    """

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.key = config.api_key.encode() if config.api_key else None
        self.max_body = config.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guard(scope, receive, counted_send)
        finally:  # the matched route's template, never the raw path: clients must not grow the metrics
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests[(route, status)] += 1

    async def _guard(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key is None and not is_loopback(_host_name(headers.get("host", ""))):
            return await _send(send, scope, APIError(400, "untrusted Host header: this server accepts only "
                                                     "loopback names (start it with --api-key to serve others)"))
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            challenge = {"www-authenticate": 'Basic realm="openseek"'} if scope["path"] == "/" else {}
            error = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                             code="invalid_api_key")
            return await _send(send, scope, error, challenge)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _send(send, scope, self._too_large())
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send(send, scope, self._too_large())
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, which streaming responses watch for

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.key)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than the limit of {self.max_body} bytes",
                        code="request_too_large")


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send(send, scope, error: APIError, headers: dict | None = None):
    await error.response(headers)(scope, None, send)


# ---- metrics -------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus text exposition, kept by hand: a few counters and gauges need no client library."""

    def __init__(self):
        self.requests = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.first_token_seconds = [0.0, 0]  # sum, count
        self.request_seconds = [0.0, 0]

    def render(self, in_flight: int, capacity: int) -> str:
        lines = [
            "# HELP openseek_requests_total HTTP requests by route and status code.",
            "# TYPE openseek_requests_total counter",
            *(f'openseek_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())),
            "# HELP openseek_prompt_tokens_total Prompt tokens processed.",
            "# TYPE openseek_prompt_tokens_total counter",
            f"openseek_prompt_tokens_total {self.prompt_tokens}",
            "# HELP openseek_generation_tokens_total Tokens generated.",
            "# TYPE openseek_generation_tokens_total counter",
            f"openseek_generation_tokens_total {self.completion_tokens}",
            "# HELP openseek_reasoning_tokens_total Generated tokens inside <think>...</think>.",
            "# TYPE openseek_reasoning_tokens_total counter",
            f"openseek_reasoning_tokens_total {self.reasoning_tokens}",
            "# HELP openseek_sequences_in_flight Sequences generating or waiting for a batch slot.",
            "# TYPE openseek_sequences_in_flight gauge",
            f"openseek_sequences_in_flight {in_flight}",
            "# HELP openseek_sequences_capacity Sequences admitted at most before requests get 429.",
            "# TYPE openseek_sequences_capacity gauge",
            f"openseek_sequences_capacity {capacity}",
            "# HELP openseek_time_to_first_token_seconds Time from request to first generated token.",
            "# TYPE openseek_time_to_first_token_seconds summary",
            f"openseek_time_to_first_token_seconds_sum {self.first_token_seconds[0]:.6f}",
            f"openseek_time_to_first_token_seconds_count {self.first_token_seconds[1]}",
            "# HELP openseek_request_seconds Time from request to last generated token.",
            "# TYPE openseek_request_seconds summary",
            f"openseek_request_seconds_sum {self.request_seconds[0]:.6f}",
            f"openseek_request_seconds_count {self.request_seconds[1]}",
        ]
        return "\n".join(lines) + "\n"


# ---- generation ----------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """What one choice adds in one step: reasoning text, answer text, or its end."""

    index: int
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    seed: int | None
    splitter: ReasoningSplitter | None  # None: a text completion, no reasoning split
    handle: object = None  # the engine's request, once started
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Job:
    """One request, validated and tokenized."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    choices: list[Choice]
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    released: bool = False

    def usage(self) -> Usage:
        completion = sum(c.completion_tokens for c in self.choices)
        reasoning = sum(c.reasoning_tokens for c in self.choices)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                     total_tokens=len(self.prompt_ids) + completion,
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))


class Server:
    def __init__(self, engine, tokenizer, config: ServeConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.stop_token_ids = sorted(set(_eos_ids(engine, tokenizer)))
        self.metrics = Metrics()
        self.in_flight = 0
        self.accepting = True

    def close(self) -> None:
        """Stop taking requests (503 from now on) and stop the engine; running streams end with an error."""
        self.accepting = False
        self.engine.close()

    # -- building a job --

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        self._check_common(request)
        if len(request.messages) > self.config.max_messages:
            raise APIError(400, f"too many messages: {len(request.messages)} > {self.config.max_messages}",
                           param="messages")
        messages = []
        for message in request.messages:
            text = message.text()
            if message.role == "assistant":
                text = strip_reasoning(text)
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the model's own template rejected the conversation (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        return self._job(prompt, request, max_tokens, param, reasoning=prompt_opens_reasoning(prompt))

    def completion_job(self, request: CompletionRequest) -> Job:
        self._check_common(request)
        return self._job(request.prompt, request, request.max_tokens, "max_tokens", reasoning=None)

    def _check_common(self, request: SamplingParams) -> None:
        if request.model != self.config.model_name:
            raise APIError(404, f"The model `{request.model}` does not exist; this server serves "
                                f"`{self.config.model_name}`.", param="model", code="model_not_found")
        if request.n > self.config.max_n:
            raise APIError(400, f"n={request.n} is above this server's limit of {self.config.max_n}", param="n")

    def _job(self, prompt: str, request: SamplingParams, max_tokens: int | None, param: str, reasoning) -> Job:
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        limit = self.config.max_model_len
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens and the prompt has "
                                f"{len(prompt_ids)} tokens.", param="messages", code="context_length_exceeded")
        room = limit - len(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"'{param}' is too large: {max_tokens}. This model's maximum context length is "
                                f"{limit} tokens and your request has {len(prompt_ids)} input tokens.",
                           param=param, code="context_length_exceeded")
        base_seed = request.seed
        choices = [
            Choice(index=i, seed=None if base_seed is None else (base_seed + i) % 2**63,
                   splitter=None if reasoning is None else ReasoningSplitter(in_reasoning=reasoning))
            for i in range(request.n)
        ]
        return Job(prompt_ids=prompt_ids, max_tokens=max_tokens or room,
                   temperature=1.0 if request.temperature is None else request.temperature,
                   top_p=1.0 if request.top_p is None else request.top_p,
                   stops=request.stop_list(), choices=choices)

    # -- running a job --

    def start(self, job: Job) -> None:
        """Admit a job and hand its sequences to the engine, or say why not (429 full, 503 stopping, 400)."""
        if not self.accepting:
            raise APIError(503, "the server is shutting down", code="unavailable")
        wanted = len(job.choices)
        if self.in_flight + wanted > self.config.max_sequences:
            raise APIError(429, f"the server is busy: {self.in_flight} sequences in flight, limit "
                                f"{self.config.max_sequences}; retry shortly", code="queue_full")
        self.in_flight += wanted
        try:
            for choice in job.choices:
                choice.handle = self.engine.submit(
                    job.prompt_ids, max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                    seed=choice.seed, stop_token_ids=self.stop_token_ids)
        except ValueError as e:  # the engine names what it cannot take (e.g. a token outside the model's vocabulary)
            self.release(job)
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine is closed
            self.release(job)
            raise APIError(503, f"the engine is not running: {e}", code="unavailable") from None
        self.metrics.prompt_tokens += len(job.prompt_ids)

    def release(self, job: Job) -> None:
        """Cancel what is left of a job and give back its slots; safe to call more than once."""
        if job.released:
            return
        job.released = True
        self.in_flight -= len(job.choices)
        for choice in job.choices:
            if choice.handle is not None:
                choice.handle.cancel()
        usage = job.usage()
        self.metrics.completion_tokens += usage.completion_tokens
        self.metrics.reasoning_tokens += usage.completion_tokens_details.reasoning_tokens
        self.metrics.request_seconds[0] += time.perf_counter() - job.started
        self.metrics.request_seconds[1] += 1

    async def run(self, job: Job) -> AsyncIterator[Piece]:
        """All choices of a started job, interleaved as they are generated."""
        try:
            async for piece in _merge([self._run_choice(job, choice) for choice in job.choices]):
                yield piece
        finally:
            self.release(job)

    async def _run_choice(self, job: Job, choice: Choice) -> AsyncIterator[Piece]:
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopMatcher(job.stops)
        finish = None
        handle = choice.handle
        async for token in handle:
            if job.first_token is None:
                job.first_token = time.perf_counter()
                self.metrics.first_token_seconds[0] += job.first_token - job.started
                self.metrics.first_token_seconds[1] += 1
            choice.completion_tokens += 1
            if token in self.stop_token_ids:
                finish = "stop"
                break
            text = stops.feed(decoder.add(token))
            piece = self._piece(choice, text)
            if piece is not None:
                yield piece
            if stops.stopped:
                finish = "stop"
                break
        else:
            if handle.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"generation ended early ({handle.finish_reason}): the server is stopping")
            finish = handle.finish_reason
        tail = self._piece(choice, stops.flush() if not stops.stopped else "", flush=True)
        if tail is not None:
            yield tail
        choice.finish_reason = finish
        yield Piece(choice.index, finish_reason=finish)

    def _piece(self, choice: Choice, text: str, flush: bool = False) -> Piece | None:
        splitter = choice.splitter
        if splitter is None:
            reasoning, content = "", text
        else:
            was_reasoning = splitter.in_reasoning
            reasoning, content = splitter.feed(text)
            if flush:
                more_reasoning, more_content = splitter.flush()
                reasoning, content = reasoning + more_reasoning, content + more_content
            elif was_reasoning or splitter.in_reasoning:
                choice.reasoning_tokens += 1
        choice.reasoning.append(reasoning)
        choice.content.append(content)
        return Piece(choice.index, reasoning, content) if reasoning or content else None


async def _merge(generators: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Interleave several async generators; cancelling the consumer cancels them all (and their engine work)."""
    if len(generators) == 1:
        gen = generators[0]
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen):
        try:
            async for item in gen:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put(e)

    tasks = [asyncio.create_task(pump(gen)) for gen in generators]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _eos_ids(engine, tokenizer) -> list[int]:
    model = getattr(engine, "model", None)
    ids = list(getattr(getattr(model, "cfg", None), "eos_token_id", None) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


# ---- the app -------------------------------------------------------------------------------------------------


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk_json(chunk: ChatCompletionChunk) -> dict:
    """A chunk as OpenAI writes it: empty delta fields left out, `usage` only on the usage chunk."""
    data = chunk.model_dump(exclude={"usage"} if chunk.usage is None else set())
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


def _page() -> tuple[str, str]:
    """The chat page and a Content-Security-Policy that lets it load nothing but its own inline code."""
    html = (STATIC / "index.html").read_text()
    digests = {
        kind: " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                       for body in re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S))
        for kind in ("script", "style")
    }
    csp = (f"default-src 'none'; script-src {digests['script']}; style-src {digests['style']}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def create_app(engine, tokenizer, config: ServeConfig) -> FastAPI:
    server = Server(engine, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.close)

    # no /docs or /redoc: those pages load their scripts from a CDN
    app = FastAPI(title="openseek", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    page, csp = _page()
    error_responses = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)}

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response({"retry-after": "1"} if error.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                            code="invalid_json").response()
        if first.get("type") == "model_attributes_type" and not where:
            return APIError(400, "the request body must be a JSON object sent with "
                                 "Content-Type: application/json", code="invalid_json").response()
        param = ".".join(where) or None
        return APIError(422, f"{param or 'body'}: {first.get('msg')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = "not found: " + request.url.path if error.status_code == 404 else str(error.detail)
        return APIError(error.status_code, message).response(getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception):
        body = {"error": {"message": f"internal error: {type(error).__name__}", "type": "server_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers={"content-security-policy": csp, "x-content-type-options": "nosniff",
                                           "referrer-policy": "no-referrer", "cache-control": "no-store"})

    @app.get("/health")
    async def health():
        if not server.accepting:
            raise APIError(503, "the server is shutting down", code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.in_flight, config.max_sequences),
                                 media_type="text/plain; version=0.0.4")

    def card() -> ModelCard:
        return ModelCard(id=config.model_name, created=now(), max_model_len=config.max_model_len)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses)
    async def models():
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=error_responses)
    async def model(model: str):
        if model != config.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return card()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=error_responses)
    async def chat_completions(request: ChatCompletionRequest):
        job = server.chat_job(request)
        server.start(job)
        if request.stream:
            usage = request.stream_options is not None and request.stream_options.include_usage
            return JobStream(_chat_events(server, job, config.model_name, usage), lambda: server.release(job))
        return await _chat_response(server, job, config.model_name)

    @app.post("/v1/completions", response_model=TextCompletion, responses=error_responses)
    async def completions(request: CompletionRequest):
        job = server.completion_job(request)
        server.start(job)
        if request.stream:
            usage = request.stream_options is not None and request.stream_options.include_usage
            return JobStream(_text_events(server, job, config.model_name, usage), lambda: server.release(job))
        return await _text_response(server, job, config.model_name)

    wrapped = Gate(app, config, server.metrics)
    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(wrapped, allow_origins=config.allowed_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type"])
    app.state.asgi = wrapped
    return app


def asgi_app(engine, tokenizer, config: ServeConfig):
    """The app behind its gate (and CORS when configured): what uvicorn serves."""
    return create_app(engine, tokenizer, config).state.asgi


async def _chat_response(server: Server, job: Job, model: str) -> ChatCompletion:
    async for _ in server.run(job):
        pass
    choices = [
        ChatChoice(index=c.index, finish_reason=c.finish_reason,
                   message=AssistantMessage(content="".join(c.content),
                                            reasoning_content="".join(c.reasoning) or None))
        for c in job.choices
    ]
    return ChatCompletion(id=new_id("chatcmpl"), created=now(), model=model, choices=choices, usage=job.usage())


async def _text_response(server: Server, job: Job, model: str) -> TextCompletion:
    async for _ in server.run(job):
        pass
    choices = [TextChoice(index=c.index, text="".join(c.content), finish_reason=c.finish_reason)
               for c in job.choices]
    return TextCompletion(id=new_id("cmpl"), created=now(), model=model, choices=choices, usage=job.usage())


class JobStream(StreamingResponse):
    """Server-sent events of one job. However the response ends (done, client gone before the first byte,
    cancelled), `on_close` runs, so the engine stops its sequences and the job's slots come back."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _chat_events(server: Server, job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    base = dict(id=new_id("chatcmpl"), created=now(), model=model)
    try:
        for choice in job.choices:
            yield sse(_chunk_json(ChatCompletionChunk(**base, choices=[
                ChatChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""))])))
        async for piece in server.run(job):
            delta = Delta(reasoning_content=piece.reasoning or None, content=piece.content or None)
            chunk = ChatCompletionChunk(**base, choices=[
                ChatChunkChoice(index=piece.index, delta=delta, finish_reason=piece.finish_reason)])
            yield sse(_chunk_json(chunk))
        if include_usage:
            yield sse(_chunk_json(ChatCompletionChunk(**base, choices=[], usage=job.usage())))
    except Exception as e:  # headers are sent: report in-band, as OpenAI-compatible servers do
        yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                             "code": None}})
    yield sse("[DONE]")


async def _text_events(server: Server, job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    base = dict(id=new_id("cmpl"), created=now(), model=model)
    try:
        async for piece in server.run(job):
            choice = TextChoice(index=piece.index, text=piece.content, finish_reason=piece.finish_reason)
            yield sse(TextCompletion(**base, choices=[choice]).model_dump(exclude={"usage"}))
        if include_usage:
            yield sse(TextCompletion(**base, choices=[], usage=job.usage()).model_dump())
    except Exception as e:
        yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                             "code": None}})
    yield sse("[DONE]")


# ---- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (HF format, with its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("OPENSEEK_API_KEY"),
                        help="require this key (Bearer) on every route but /health; default $OPENSEEK_API_KEY")
    parser.add_argument("--served-model-name", help="the name clients pass as `model` (default: directory name)")
    parser.add_argument("--allowed-origins", nargs="*", default=[],
                        help="origins allowed by CORS (default: none, CORS off)")
    parser.add_argument("--max-model-len", type=int,
                        help="longest prompt + answer (default: the model's context, at most 4096)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--max-sequences", type=int, default=64,
                        help="sequences in flight (generating or waiting) before requests get 429")
    parser.add_argument("--max-n", type=int, default=8, help="largest `n` a request may ask for")
    parser.add_argument("--max-messages", type=int, default=256, help="most messages in one chat request")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def check_bind(host: str, api_key: str | None) -> str | None:
    """Why we refuse to start, or None: a non-loopback address without a key would hand the model to anyone."""
    if is_loopback(host) or api_key:
        return None
    return (f"openseek serve: refusing to listen on {host} without an API key: anyone who can reach this "
            f"machine could use the model and read what it says. Pass --api-key KEY (or set OPENSEEK_API_KEY), "
            f"or keep the default --host 127.0.0.1.")


def load_engine(model_dir: str, dtype=None, device="cpu", max_batch_size: int = 32, max_model_len=None):
    """The model, its tokenizer and an Engine on it: what both `serve` and `chat` run on."""
    import openseek
    from openseek.checkpoint import resolve
    from openseek.tokenizer import Tokenizer

    directory = resolve(model_dir)  # a hub id is downloaded here, before serving: the only network access
    model = openseek.load(directory, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(directory)
    return openseek.Engine(model, max_batch_size=max_batch_size, max_seq_len=max_model_len), tokenizer


def main(args) -> int:
    refusal = check_bind(args.host, args.api_key)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    import torch
    import uvicorn

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine, tokenizer = load_engine(args.model, args.dtype, device, args.max_batch_size, args.max_model_len)
    config = ServeConfig(
        model_name=args.served_model_name or Path(args.model).name, max_model_len=engine.max_seq_len,
        api_key=args.api_key, allowed_origins=args.allowed_origins, max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages, max_n=args.max_n, max_sequences=args.max_sequences,
    )
    print(f"openseek serve: {config.model_name} on http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1){'' if config.api_key else ', loopback only'}", file=sys.stderr)
    uvicorn.run(asgi_app(engine, tokenizer, config), host=args.host, port=args.port, log_level="warning",
                server_header=False, timeout_graceful_shutdown=5)
    return 0
