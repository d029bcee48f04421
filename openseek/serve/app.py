"""`openseek serve`: a private, OpenAI-compatible server for reasoning models, with a chat page at `/`.

Private by default: it listens on 127.0.0.1 and refuses any other address without an API key; the key is
checked in constant time on every route but /health; it makes no outbound connection (a `--model` given as a
hub id is downloaded at startup, before serving; a local directory needs no network at all); CORS is off unless
--allowed-origins is given; body size, message count, `n`, `max_tokens` and the number of sequences in flight
are capped. Every error is an OpenAI error envelope (Anthropic's under /v1/messages). All requests share the one
Engine (continuous batching, prefix caching unless --no-prefix-cache).

Besides /v1/chat/completions, /v1/completions and /v1/models it answers the two agent APIs, each a translation into
a chat request (anthropic.py: Anthropic's POST /v1/messages and /v1/messages/count_tokens; responses.py: OpenAI's
POST /v1/responses), and vLLM's tokenizer routes, which lm-evaluation-harness uses: POST /tokenize,
POST /detokenize and GET /tokenizer_info.

This module is the HTTP face only: routes, the two response kinds (chat and text, each written whole or streamed
from the same Pieces; a client that hangs up before either is complete cancels its job, counted on /metrics), the
agent APIs' writers run the same way (`respond_with`), exception handlers and the command line. The checks before any route are gate.py's, the work is server.py's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from openseek.device import resolve_device
from openseek.flags import add_engine_arguments
from openseek.serve import anthropic, responses
from openseek.serve.gate import APIError, Gate, check_bind, error_envelope
from openseek.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from openseek.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionRequest,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    FunctionCallOut,
    ModelCard,
    ModelList,
    SamplingFields,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    new_id,
    now,
)
from openseek.serve.job import Choice, Job, Piece, Scored
from openseek.serve.server import Server, ServeConfig, load_engine

STATIC = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up first: nobody reads it, /metrics counts it


# ---- the two response kinds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How one endpoint writes a job. The whole response and every streamed chunk go through `choice`: given a
    choice's whole output it makes an entry of the response, given one step's Piece an entry of a chunk."""

    prefix: str  # of the response id
    response: type[BaseModel]
    chunk: type[BaseModel]
    choice: Callable[[Piece, bool], BaseModel]  # (piece, streamed) -> one entry of `choices`
    opening: Callable[[Choice], BaseModel] | None = None  # streamed for each choice before any text


def _logprob(value: float) -> float:
    """JSON has no -inf: clamp as vLLM does."""
    return max(value, -9999.0)


def _chat_logprobs(piece: Piece) -> ChatLogprobs | None:
    def entries(scored: list[Scored]) -> list[TokenLogprob]:
        return [TokenLogprob(token=s.token, logprob=_logprob(s.logprob), bytes=list(s.token.encode()),
                             top_logprobs=[TopLogprob(token=t, logprob=_logprob(v), bytes=list(t.encode()))
                                           for t, v in s.top])
                for s in scored]

    if piece.content_logprobs is None:
        return None
    return ChatLogprobs(content=entries(piece.content_logprobs),
                        reasoning_content=entries(piece.reasoning_logprobs) or None)


def _chat_choice(piece: Piece, streamed: bool) -> BaseModel:
    reasoning = piece.reasoning or None
    logprobs = _chat_logprobs(piece)
    functions = [FunctionCallOut(name=call.name, arguments=call.arguments) for call in piece.tool_calls]
    if streamed:
        calls = [ToolCallDelta(index=call.index, id=call.id, function=function)
                 for call, function in zip(piece.tool_calls, functions)]
        delta = Delta(reasoning_content=reasoning, reasoning=reasoning, content=piece.content or None,
                      tool_calls=calls or None)
        return ChatChunkChoice(index=piece.index, delta=delta, logprobs=logprobs, finish_reason=piece.finish_reason)
    calls = [ToolCallOut(id=call.id, function=function) for call, function in zip(piece.tool_calls, functions)]
    content = piece.content if not calls or piece.content.strip() else None  # OpenAI: null beside tool calls
    message = AssistantMessage(content=content, reasoning_content=reasoning, reasoning=reasoning,
                               tool_calls=calls or None)
    return ChatChoice(index=piece.index, message=message, logprobs=logprobs, finish_reason=piece.finish_reason)


def _text_logprobs(piece: Piece) -> TextLogprobs | None:
    """The legacy shape; each position's dict holds the most likely tokens and the chosen one (OpenAI's rule)."""
    if piece.content_logprobs is None:
        return None
    out = TextLogprobs()
    for s in piece.content_logprobs:
        out.tokens.append(s.token)
        out.token_logprobs.append(None if s.logprob is None else _logprob(s.logprob))
        out.top_logprobs.append(None if s.top is None else
                                {t: _logprob(v) for t, v in s.top} | {s.token: _logprob(s.logprob)})
        out.text_offset.append(s.offset)
    return out


def _text_choice(piece: Piece, streamed: bool) -> BaseModel:
    return TextChoice(index=piece.index, text=piece.content, logprobs=_text_logprobs(piece),
                      finish_reason=piece.finish_reason)


CHAT = Kind("chatcmpl", ChatCompletion, ChatCompletionChunk, _chat_choice,
            opening=lambda choice: ChatChunkChoice(index=choice.index, delta=Delta(role="assistant", content="")))
TEXT = Kind("cmpl", TextCompletion, TextCompletion, _text_choice)


async def respond(server: Server, job: Job, request: SamplingFields, kind: Kind, receive):
    """Start the job; answer with the whole response once it is done, or stream it as server-sent events. Either
    way a client that hangs up first (`receive`, the request's ASGI channel, says so) cancels the job: its
    sequences leave the batch at the next step and /metrics counts it."""
    server.start(job)
    base = dict(id=new_id(kind.prefix), created=now(), model=request.model)  # the base's name or an adapter's
    if request.stream:
        usage = request.stream_options is not None and request.stream_options.include_usage
        return JobStream(_events(server, job, kind, base, usage), lambda: server.cancel(job))
    try:
        hung_up = await _hung_up_first(server.run(job), receive)
    except Exception as e:  # the engine failed the job (its own error, or that of the step it ran in)
        raise APIError(500, _generation_failed(e)) from e
    if hung_up:
        server.cancel(job)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return kind.response(**base, choices=[kind.choice(c.whole(), False) for c in job.choices], usage=job.usage())


async def _hung_up_first(pieces: AsyncIterator[Piece], receive) -> bool:
    """Run `pieces` to their end, unless the client hangs up first: then they are cancelled and the answer is True.
    The error of `pieces`, if any, is raised."""

    async def drain():
        async for _ in pieces:
            pass

    async def hang_up():
        while (await receive())["type"] != "http.disconnect":
            pass

    draining, watching = asyncio.create_task(drain()), asyncio.create_task(hang_up())
    try:
        done, _ = await asyncio.wait((draining, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:  # either way, and when this handler is cancelled itself, neither task outlives it
        for task in (draining, watching):
            task.cancel()
        await asyncio.gather(draining, watching, return_exceptions=True)
    if draining in done:
        draining.result()
        return False
    return True


async def _events(server: Server, job: Job, kind: Kind, base: dict, include_usage: bool) -> AsyncIterator[str]:
    def event(choices: list, usage=None) -> str:
        return sse(_chunk_json(kind.chunk(**base, choices=choices, usage=usage)))

    try:
        if kind.opening is not None:
            for choice in job.choices:
                yield event([kind.opening(choice)])
        async for piece in server.run(job):
            yield event([kind.choice(piece, True)])
        if include_usage:
            yield event([], job.usage())
    except Exception as e:  # headers are sent: report in-band, as OpenAI-compatible servers do
        yield sse(error_envelope(500, _generation_failed(e)))
    yield sse("[DONE]")


def _generation_failed(error: Exception) -> str:
    """What the client reads of an error that ended its job: the error's type and its message."""
    return f"generation failed: {type(error).__name__}: {error}"


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk_json(chunk: BaseModel) -> dict:
    """A chunk as OpenAI writes it: empty delta fields left out, `usage` only on the usage chunk."""
    data = chunk.model_dump(exclude={"usage"} if chunk.usage is None else set())
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


async def respond_with(server: Server, job: Job, writer, stream: bool, receive):
    """`respond` for the agent APIs, whose `writer` (anthropic.MessageWriter, responses.ResponseWriter) turns the
    job's Pieces into its API's events and builds its whole answer as it goes: stream the events, or answer with
    `writer.whole()` once the job is done. A client that hangs up first cancels the job, as in `respond`."""
    server.start(job)
    if stream:
        return JobStream(_written(server, job, writer), lambda: server.cancel(job))

    async def written():
        async for piece in server.run(job):
            writer.feed(piece)
            yield piece

    try:
        hung_up = await _hung_up_first(written(), receive)
    except Exception as e:  # the engine failed the job
        raise APIError(500, _generation_failed(e)) from e
    if hung_up:
        server.cancel(job)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    writer.finish()
    return JSONResponse(writer.whole())


async def _written(server: Server, job: Job, writer) -> AsyncIterator[str]:
    try:
        for event in writer.start():
            yield event
        async for piece in server.run(job):
            for event in writer.feed(piece):
                yield event
        for event in writer.finish():
            yield event
    except Exception as e:  # headers are sent: report in-band, in the API's own error event
        for event in writer.failed(_generation_failed(e)):
            yield event


class JobStream(StreamingResponse):
    """Server-sent events of one job. However the response ends short of its last event (client gone before the
    first byte or mid-stream, cancelled), `on_hang_up` runs, so the engine stops its sequences, the job's slots
    come back and the cancellation is counted; a stream sent whole gave its slots back as its job ended."""

    def __init__(self, events: AsyncIterator[str], on_hang_up):
        super().__init__(self._all_of(events), media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_hang_up = on_hang_up
        self.sent_all = False

    async def _all_of(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        async for event in events:
            yield event
        self.sent_all = True  # the last event was sent: the stream asked for the next one

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.sent_all:
                self.on_hang_up()


# ---- the app -------------------------------------------------------------------------------------------------


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


def _error(request: Request, error: APIError, headers: dict | None = None) -> JSONResponse:
    """The error in the envelope of the API the request spoke."""
    path = request.url.path
    return JSONResponse(error.body(path), status_code=error.http_status(path), headers=headers)


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                        code="invalid_json")
    if first.get("type") == "invalid_unicode":  # a lone surrogate: the body is not text (protocol.Body)
        return APIError(400, first["msg"], param=first["ctx"]["param"], code="invalid_unicode")
    if first.get("type") == "model_attributes_type" and not where:
        return APIError(400, "the request body must be a JSON object sent with Content-Type: application/json",
                        code="invalid_json")
    param = ".".join(where) or None
    return APIError(422, f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_value")


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

    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers={"content-security-policy": csp, "x-content-type-options": "nosniff",
                                           "referrer-policy": "no-referrer", "cache-control": "no-store"})

    @app.get("/health")
    async def health():
        reason = server.unavailable()
        if reason is not None:
            raise APIError(503, reason, code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    _add_model_routes(app, config, error_responses)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=error_responses)
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        return await respond(server, server.chat_job(request), request, CHAT, http.receive)

    @app.post("/v1/completions", response_model=TextCompletion, responses=error_responses)
    async def completions(request: CompletionRequest, http: Request):
        return await respond(server, server.completion_job(request), request, TEXT, http.receive)

    @app.post("/v1/messages", responses=error_responses)
    async def messages(request: anthropic.MessagesRequest, http: Request):
        job = anthropic.job(server, request)
        writer = anthropic.MessageWriter(job, config.model_name)
        return await respond_with(server, job, writer, request.stream, http.receive)

    @app.post("/v1/messages/count_tokens", responses=error_responses)
    async def count_tokens(request: anthropic.CountTokensRequest):
        return anthropic.count_tokens(server, request)

    @app.post("/v1/responses", responses=error_responses)
    async def create_response(request: responses.ResponsesRequest, http: Request):
        job = responses.job(server, request)
        writer = responses.ResponseWriter(job, config.model_name, request)
        return await respond_with(server, job, writer, request.stream, http.receive)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses)
    async def tokenize(request: TokenizeRequest):
        return server.tokenize(request)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses)
    async def detokenize(request: DetokenizeRequest):
        return server.detokenize(request)

    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses)
    async def tokenizer_info():
        return server.tokenizer_info()

    app.state.asgi = _gated(app, config, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error object (Anthropic's under /v1/messages): ours, validation failures, HTTP errors
    and crashes."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error(request, error, {"retry-after": "1"} if error.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(request, _validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = "not found: " + request.url.path if error.status_code == 404 else str(error.detail)
        return _error(request, APIError(error.status_code, message), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception):
        return _error(request, APIError(500, f"internal error: {type(error).__name__}"))


def _add_model_routes(app: FastAPI, config: ServeConfig, error_responses: dict) -> None:
    """/v1/models and /v1/models/{model}: the base model and the LoRA adapters served beside it."""
    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=now(), max_model_len=config.max_model_len,
                         parent=None if name == config.model_name else config.model_name)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses)
    async def models():
        return ModelList(data=[card(name) for name in config.served_models])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=error_responses)
    async def model(model: str):
        if model not in config.served_models:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return card(model)


def _gated(app: FastAPI, config: ServeConfig, server: Server):
    """The app behind the gate (API key, body size, request count) and, when origins are allowed, CORS."""
    wrapped = Gate(app, config.api_key, config.max_body_bytes, server.metrics.count_request)
    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(wrapped, allow_origins=config.allowed_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "x-api-key", "content-type"])
    return wrapped


def asgi_app(engine, tokenizer, config: ServeConfig):
    """The app behind its gate (and CORS when configured): what uvicorn serves."""
    return create_app(engine, tokenizer, config).state.asgi


# ---- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (HF format, with its tokenizer)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a LoRA adapter in PEFT's format served beside --model as model NAME (repeatable: "
                             "requests for different adapters and the base share one batch); a single --adapter "
                             "DIR with no NAME= serves the model with that adapter on top, under --model's name")
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
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt in full (default: reuse the cached start of recent prompts)")
    add_engine_arguments(parser)


def main(args) -> int:
    refusal = check_bind(args.host, args.api_key)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    model_name = args.served_model_name or Path(args.model).name
    try:
        single, adapters = adapter_flags(args.adapter, model_name)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    import uvicorn

    engine, tokenizer = load_engine(args.model, args.dtype, resolve_device(args.device), args.max_batch_size,
                                    args.max_model_len, args.quantize, args.group_size, single,
                                    prefix_cache=not args.no_prefix_cache, speculative=args.speculative,
                                    num_speculative_tokens=args.num_speculative_tokens, compile=args.compile,
                                    cuda_graphs=args.cuda_graphs, adapters=adapters)
    config = ServeConfig(
        model_name=model_name, max_model_len=engine.max_seq_len,
        api_key=args.api_key, allowed_origins=args.allowed_origins, max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages, max_n=args.max_n, max_sequences=args.max_sequences,
        reasoning_budget=args.reasoning_budget, adapters=list(adapters),
    )
    print(f"openseek serve: {config.model_name} on http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1){'' if config.api_key else ', loopback only'}", file=sys.stderr)
    uvicorn.run(asgi_app(engine, tokenizer, config), host=args.host, port=args.port, log_level="warning",
                server_header=False, timeout_graceful_shutdown=5)
    return 0


def adapter_flags(values: list[str], model_name: str) -> tuple[str | None, dict[str, str]]:
    """--adapter's values as (one adapter on top of the model, {name: directory} of adapters served beside it):
    one bare DIR is the first, NAME=DIR values the second; anything else is an error that says how to write it."""
    if len(values) == 1 and "=" not in values[0]:
        return values[0], {}
    adapters = {}
    for value in values:
        name, _, directory = value.partition("=")
        if not name or not directory:
            raise ValueError(f"--adapter {value}: name each adapter, --adapter NAME=DIR (NAME is the `model` "
                             "requests pass); a single --adapter DIR serves the model with that one adapter on top")
        if name in adapters or name == model_name:
            raise ValueError(f"--adapter {value}: the name {name!r} is taken already (by "
                             f"{'the base model' if name == model_name else 'another adapter'}); names are unique")
        adapters[name] = directory
    return None, adapters
