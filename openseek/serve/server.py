"""The engine side of serving, shared by `openseek serve` and `openseek chat`: requests become Jobs, Jobs run on
the one Engine, and the tokens come back as Pieces of reasoning and answer text.

It checks what the model and the server's limits decide (context length, `n`, message count, sequences in flight),
tokenizes through the model's chat template, stops on the model's stop tokens and the request's stop strings,
and splits `<think>` reasoning from the answer. It imports no web framework, so the terminal chat starts
without one; the HTTP layer (app.py) only turns Pieces into OpenAI responses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from openseek.checkpoint import load, resolve
from openseek.engine import Engine, stop_token_ids
from openseek.serve.detokenize import IncrementalDecoder, StopMatcher
from openseek.serve.gate import APIError
from openseek.serve.metrics import Metrics
from openseek.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionTokensDetails,
    SamplingParams,
    Usage,
)
from openseek.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning, strip_reasoning
from openseek.tokenizer import Tokenizer


@dataclass
class ServeConfig:
    """What the server is called and what it allows; the limits are the CLI's flags."""

    model_name: str
    max_model_len: int
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_n: int = 8
    max_sequences: int = 64  # sequences admitted (generating or waiting for a batch slot); beyond it: 429


@dataclass
class Piece:
    """What one choice adds in one step: reasoning text, answer text, or its end."""

    index: int
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None


@dataclass
class Choice:
    """One of a job's `n` answers: its engine request and all it has produced so far."""

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
    """Admits jobs within the limits, runs them on the shared Engine and keeps the metrics."""

    def __init__(self, engine, tokenizer, config: ServeConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.stop_token_ids = stop_token_ids(engine.cfg, tokenizer)
        self.in_flight = 0
        self.metrics = Metrics(config.max_sequences, lambda: self.in_flight)
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
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))

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
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        self.metrics.reasoning_tokens.inc(usage.completion_tokens_details.reasoning_tokens)
        self.metrics.request_seconds.observe(time.perf_counter() - job.started)

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
                self.metrics.time_to_first_token.observe(job.first_token - job.started)
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


def load_engine(model_dir: str, dtype=None, device="cpu", max_batch_size: int = 32, max_model_len=None,
                quantize: str = "none", group_size: int = 32, adapter: str | None = None):
    """The model (in `dtype`, maybe weight-only quantised, maybe with a PEFT LoRA `adapter` on top), its tokenizer
    and an Engine on it: what both `serve` and `chat` run on."""
    directory = resolve(model_dir)  # a hub id is downloaded here, before serving: the only network access
    model = load(directory, dtype=dtype, device=device, quantize=quantize, group_size=group_size, adapter=adapter)
    return Engine(model, max_batch_size=max_batch_size, max_seq_len=max_model_len), Tokenizer.from_dir(directory)
