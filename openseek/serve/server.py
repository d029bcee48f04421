"""The engine side of serving, shared by `openseek serve` and `openseek chat`: requests become Jobs, Jobs run on
the one Engine, and the tokens come back as Pieces of reasoning and answer text.

It checks what the model and the server's limits decide (context length, `n`, message count, sequences in flight),
maps the request's `model` to the base or one of the LoRA adapters served beside it (multi_lora.py), tokenizes
through the model's chat template (with the request's tools, in the template's call format: tools.py), stops on the model's stop tokens
and the request's stop strings, splits `<think>` reasoning from the answer (and the tokens' log-probs with it),
parses tool calls out of the answer, echoes the prompt when asked, and answers the tokenizer endpoints.

What the answer may be is one constraint per choice (engine/constraint.py): `response_format` (json_object,
json_schema), `tool_choice` "required" or a named function (a call, under `tools.call_rule`'s grammar; with "auto"
and a response_format, a call or the JSON), and a thinking budget (`thinking_budget_tokens`, else
`reasoning_effort`'s budget from REASONING_EFFORT_BUDGETS, else the server's --reasoning-budget) that closes the
`<think>` block when it runs out. Grammars apply only after the reasoning block closes. It imports no web framework, so the terminal chat starts
without one; the HTTP layer (app.py) only turns Pieces into OpenAI responses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import AsyncIterator

from openseek.checkpoint import load, resolve
from openseek.engine import Engine, stop_token_ids
from openseek.engine.constraint import ConstraintError, GrammarCompiler, Thinking
from openseek.multi_lora import load_adapters
from openseek.serve.detokenize import IncrementalDecoder, StopMatcher
from openseek.serve.gate import APIError
from openseek.serve.job import Choice, Job, Piece, Scored
from openseek.serve.metrics import Metrics
from openseek.serve.protocol import (
    REASONING_EFFORT_BUDGETS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from openseek.serve.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningSplitter, prompt_opens_reasoning, strip_reasoning
from openseek.serve.tools import ToolCall, ToolCallParser, call_rule, template_messages, tool_format
from openseek.tokenizer import Tokenizer


# What the server itself hands the chat template; chat_template_kwargs cannot override them.
TEMPLATE_ARGUMENTS = {"messages", "tools", "documents", "add_generation_prompt", "tokenize"}

# With a constrained answer (response_format, a required tool call) on a reasoning template and no budget named
# (request or --reasoning-budget), the thinking may use this share of max_tokens before </think> is forced.
CONSTRAINED_THINKING_SHARE = 0.5


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
    reasoning_budget: int | None = None  # thinking tokens when a request sets no budget (None: unbounded)
    adapters: list[str] = field(default_factory=list)  # LoRA adapters served beside the base, by name (--adapter)

    @property
    def served_models(self) -> list[str]:
        """What a request's `model` may name: the base model first, then each adapter (its index is its place)."""
        return [self.model_name, *self.adapters]


class Server:
    """Admits jobs within the limits, runs them on the shared Engine and keeps the metrics."""

    def __init__(self, engine, tokenizer, config: ServeConfig):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.stop_token_ids = stop_token_ids(engine.cfg, tokenizer)
        self.tool_format = tool_format(tokenizer)
        loaded = getattr(engine, "adapters", None)
        if config.adapters != ([] if loaded is None else loaded.names):
            raise ValueError(f"ServeConfig.adapters={config.adapters} but the engine's model carries "
                             f"{[] if loaded is None else loaded.names}: they must be the same, in the same order")
        self.in_flight = 0
        self.metrics = Metrics(config.max_sequences, lambda: self.in_flight, lambda: engine.running,
                               engine.prefix_cache, engine.stats if getattr(engine, "draft_tokens", 0) else None)
        self.accepting = True

    def unavailable(self) -> str | None:
        """Why the server cannot take requests now (they get 503, and so does /health), or None."""
        if not self.accepting:
            return "the server is shutting down"
        if self.engine.failure is not None:
            return f"the engine stopped on an error: {self.engine.failure!r}"
        return None

    def close(self) -> None:
        """Stop taking requests (503 from now on) and stop the engine; running streams end with an error."""
        self.accepting = False
        self.engine.close()

    # -- building a job --

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Built on the first constrained request (it reads the whole vocabulary once)."""
        return GrammarCompiler(self.tokenizer, self.stop_token_ids)

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        self._check_common(request)
        if len(request.messages) > self.config.max_messages:
            raise APIError(400, f"too many messages: {len(request.messages)} > {self.config.max_messages}",
                           param="messages")
        tools = self._tools(request)
        offered = tools if request.tool_choice != "none" else None
        takes_tools = self.tokenizer.template_takes_tools
        messages = template_messages([_template_message(m, i) for i, m in enumerate(request.messages)], offered,
                                     takes_tools, self.tool_format)
        kwargs = request.chat_template_kwargs or {}
        reserved = sorted(kwargs.keys() & TEMPLATE_ARGUMENTS)
        if reserved:
            raise APIError(400, f"chat_template_kwargs cannot set {reserved[0]!r}: the server passes it (from the "
                                f"request's own fields)", param=f"chat_template_kwargs.{reserved[0]}")
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                        tools=offered if takes_tools else None, **kwargs)
        except Exception as e:  # the model's own template rejected the conversation (e.g. role order)
            param = "chat_template_kwargs" if kwargs else "messages"
            raise APIError(400, f"the chat template rejected these {param.replace('_', ' ')}: {e}",
                           param=param) from None
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        opens = prompt_opens_reasoning(prompt)
        room = max(max_tokens or self.config.max_model_len - len(ids), 0)  # a prompt past the context: _job refuses it
        stops = self._stop_ids(request)
        return self._job([(prompt, ids)], request, max_tokens, param, "messages", reasoning=opens, stop_ids=stops,
                         logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                         constraint=self._constraint(request, offered, opens, room, stops),
                         tool_names={t["function"]["name"] for t in offered or []})

    def _tools(self, request: ChatCompletionRequest) -> list[dict] | None:
        """The request's tools as template dicts, each name unique and each parameter schema compiled;
        tool_choice naming one of them."""
        choice = request.tool_choice
        if not request.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs `tools` to choose from", param="tool_choice")
            return None
        names = []
        for i, tool in enumerate(request.tools):
            if tool.function.name in names:
                raise APIError(400, f"two tools are named {tool.function.name!r}", param=f"tools[{i}].function.name")
            names.append(tool.function.name)
            if tool.function.parameters is not None:
                self._compile_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        if not isinstance(choice, (str, type(None))) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among the "
                                f"tools ({', '.join(names)})", param="tool_choice")
        return [tool.model_dump(exclude_none=True) for tool in request.tools]

    def _compile_schema(self, schema: dict, param: str):
        try:
            return self.grammars.json_schema(schema)
        except ConstraintError as e:
            raise APIError(400, f"{param} is not a valid JSON Schema: {e}", param=param) from None

    def _constraint(self, request: ChatCompletionRequest, tools: list[dict] | None, opens_reasoning: bool,
                    max_tokens: int, stop_ids: list[int]):
        """What every choice's answer must be (see the module docstring), or None when it is free. On a reasoning
        template a constrained answer comes after the thinking, so the thinking is bounded even when nothing names
        a budget (CONSTRAINED_THINKING_SHARE of `max_tokens`) and may not stop the row: the answer always gets
        its turn."""
        answer, cause = self._answer_grammar(request, tools)
        budget, budget_param = self._thinking_budget(request)
        close, open_ = self.tokenizer.token_to_id(THINK_CLOSE), self.tokenizer.token_to_id(THINK_OPEN)
        reasons = close is not None and open_ is not None and (opens_reasoning
                                                               or THINK_CLOSE in self.tokenizer.chat_template)
        if budget_param is not None and not reasons:
            raise APIError(400, f"{budget_param}: this model does not reason (its chat template has no "
                                f"{THINK_OPEN}…{THINK_CLOSE} block)", param=budget_param)
        constraint = answer
        if reasons and answer is not None and budget is None:
            budget = int(max_tokens * CONSTRAINED_THINKING_SHARE)
        if reasons and (answer is not None or budget is not None):
            constraint = Thinking([close], budget, then=answer, opened=opens_reasoning, open_id=open_,
                                  stop_ids=stop_ids)
            cause = cause or budget_param
        if answer is not None and request.ignore_eos:
            raise APIError(400, "ignore_eos cannot apply to a constrained answer (response_format, a required tool "
                                "call): its grammar ends the answer with EOS", param="ignore_eos")
        if constraint is not None and self.engine.draft_tokens:
            raise APIError(400, "constrained decoding (response_format, a required tool call, a thinking budget) "
                                "does not run with speculative decoding (--speculative)", param=cause)
        return constraint

    def _answer_grammar(self, request: ChatCompletionRequest, tools: list[dict] | None):
        """(the grammar the answer must follow, the request field that asks for it), or (None, None)."""
        choice, fmt = request.tool_choice, request.response_format
        rules, cause = [], None
        if tools and choice not in (None, "auto"):  # "required" or a named function: a call and nothing else
            named = [t for t in tools if choice == "required" or t["function"]["name"] == choice.function.name]
            rules.append(call_rule(named, request.parallel_tool_calls and choice == "required", self.tool_format))
            cause = "tool_choice"
        if fmt is not None and fmt.type != "text":
            if rules:
                raise APIError(400, "response_format cannot apply when tool_choice forces a tool call (the answer "
                                    "is the call)", param="response_format")
            schema = {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.schema_
            self._compile_schema(schema, "response_format.json_schema.schema")
            rules.append(GrammarCompiler.lark_json(schema))
            if tools:  # "auto": a call, or the JSON answer
                rules.append(call_rule(tools, request.parallel_tool_calls, self.tool_format))
            cause = "response_format"
        if not rules:
            return None, None
        try:
            return self.grammars.lark("start: " + " | ".join(rules)), cause
        except ConstraintError as e:
            raise APIError(400, f"cannot constrain the answer: {e}", param=cause) from None

    def _thinking_budget(self, request: ChatCompletionRequest) -> tuple[int | None, str | None]:
        """(most thinking tokens, the request field that set it); the server's default names no field."""
        if request.thinking_budget_tokens is not None:
            return request.thinking_budget_tokens, "thinking_budget_tokens"
        if request.reasoning_effort is not None:
            return REASONING_EFFORT_BUDGETS[request.reasoning_effort], "reasoning_effort"
        return self.config.reasoning_budget, None

    def completion_job(self, request: CompletionRequest) -> Job:
        """Strings are tokenized without special tokens; token-id prompts go to the model as they are (no BOS)."""
        self._check_common(request)
        if request.max_tokens == 0 and not request.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it needs echo: true (to score the prompt)",
                           param="max_tokens")
        prompts = []
        for i, prompt in enumerate(request.prompts()):
            if isinstance(prompt, str):
                prompts.append((prompt, self.tokenizer.encode(prompt, add_special_tokens=False)))
                continue
            vocab = self.engine.cfg.vocab_size
            bad = next((t for t in prompt if t >= vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab})",
                               param="prompt")
            prompts.append((self.tokenizer.decode(prompt), list(prompt)))
        return self._job(prompts, request, request.max_tokens, "max_tokens", "prompt", reasoning=None,
                         stop_ids=self._stop_ids(request), logprobs=request.logprobs, echo=request.echo)

    def _stop_ids(self, request: SamplingFields) -> list[int]:
        """The tokens that end this request's choices: the model's EOS unless `ignore_eos`, and `stop_token_ids`."""
        vocab = self.engine.cfg.vocab_size
        extra = request.stop_token_ids or []
        bad = next((t for t in extra if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"stop_token_ids has {bad}, outside the vocabulary [0, {vocab})",
                           param="stop_token_ids")
        return sorted(set(extra) | (set() if request.ignore_eos else set(self.stop_token_ids)))

    def _check_common(self, request: SamplingFields) -> None:
        self._check_model(request.model)
        if request.n > self.config.max_n:
            raise APIError(400, f"n={request.n} is above this server's limit of {self.config.max_n}", param="n")

    def _job(self, prompts: list[tuple[str, list[int]]], request: SamplingFields, max_tokens: int | None,
             param: str, prompt_param: str, reasoning, stop_ids: list[int], logprobs: int | None = None,
             echo: bool = False, constraint=None, tool_names: set[str] | None = None) -> Job:
        """prompts: (text, ids) each; `n` choices per prompt, numbered prompt by prompt. stop_ids: the tokens
        that end a choice. tool_names: the tools a chat answer may call (their calls are parsed out of it)."""
        limit = self.config.max_model_len
        wanted = len(prompts) * request.n
        if wanted > self.config.max_sequences:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={request.n} is {wanted} sequences; this server runs "
                                f"at most {self.config.max_sequences} at once", param=prompt_param)
        choices = []
        for p, (_, ids) in enumerate(prompts):
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(ids) >= limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens and the prompt has "
                                    f"{len(ids)} tokens.", param=prompt_param, code="context_length_exceeded")
            room = limit - len(ids)
            if max_tokens is not None and max_tokens > room:
                raise APIError(400, f"'{param}' is too large: {max_tokens}. This model's maximum context length is "
                                    f"{limit} tokens and your request has {len(ids)} input tokens.",
                               param=param, code="context_length_exceeded")
            choices += [
                Choice(index=p * request.n + i, prompt=p, max_tokens=room if max_tokens is None else max_tokens,
                       seed=None if request.seed is None else (request.seed + i) % 2**63,
                       splitter=None if reasoning is None else ReasoningSplitter(in_reasoning=reasoning),
                       logprobs=logprobs is not None,
                       tools=ToolCallParser(tool_names, self.tool_format) if tool_names else None)
                for i in range(request.n)
            ]
        return Job(prompts=[ids for _, ids in prompts], prompt_texts=[text for text, _ in prompts],
                   temperature=1.0 if request.temperature is None else request.temperature,
                   top_p=1.0 if request.top_p is None else request.top_p, top_k=max(request.top_k or 0, 0),
                   stops=request.stop_list(), stop_token_ids=stop_ids, choices=choices, logprobs=logprobs, echo=echo,
                   constraint=constraint, include_stop=request.include_stop_str_in_output,
                   skip_special_tokens=request.skip_special_tokens,
                   adapter=self.config.served_models.index(request.model))

    # -- the tokenizer endpoints --

    def _check_model(self, model: str | None) -> None:
        served = self.config.served_models
        if model is not None and model not in served:
            names = ", ".join(f"`{name}`" for name in served)
            raise APIError(404, f"The model `{model}` does not exist; this server serves {names}.", param="model",
                           code="model_not_found")

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        ids = self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.config.max_model_len, tokens=ids)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in request.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(bos_token=t.bos_token, eos_token=t.eos_token, pad_token=t.pad_token,
                             chat_template=t.chat_template, model_max_length=self.config.max_model_len)

    # -- running a job --

    def start(self, job: Job) -> None:
        """Admit a job and hand its sequences to the engine, or say why not (429 full, 503 stopping or engine
        stopped, 400)."""
        reason = self.unavailable()
        if reason is not None:
            raise APIError(503, reason, code="unavailable")
        wanted = len(job.choices)
        if self.in_flight + wanted > self.config.max_sequences:
            raise APIError(429, f"the server is busy: {self.in_flight} sequences in flight, limit "
                                f"{self.config.max_sequences}; retry shortly", code="queue_full")
        self.in_flight += wanted
        try:
            for choice in job.choices:
                choice.handle = self.engine.submit(
                    job.prompts[choice.prompt], max_new_tokens=choice.max_tokens, temperature=job.temperature,
                    top_p=job.top_p, top_k=job.top_k, seed=choice.seed, stop_token_ids=job.stop_token_ids,
                    logprobs=job.logprobs is not None, top_logprobs=job.logprobs or 0,
                    prompt_logprobs=job.echo and job.logprobs is not None, constraint=job.constraint,
                    adapter=job.adapter)
        except ValueError as e:  # the engine names what it cannot take (e.g. a token outside the model's vocabulary)
            self.release(job)
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine is closed
            self.release(job)
            raise APIError(503, f"the engine is not running: {e}", code="unavailable") from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))

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

    def cancel(self, job: Job) -> None:
        """The client hung up before it had the whole answer: stop what is left of the job, give back its slots,
        and count a cancellation unless the job had finished generating already."""
        if not job.finished:
            self.metrics.requests_cancelled.inc()
        self.release(job)

    async def run(self, job: Job) -> AsyncIterator[Piece]:
        """All choices of a started job, interleaved as they are generated."""
        try:
            async for piece in _merge([self._run_choice(job, choice) for choice in job.choices]):
                yield piece
            job.finished = True
        finally:
            self.release(job)

    async def _run_choice(self, job: Job, choice: Choice) -> AsyncIterator[Piece]:
        decoder = IncrementalDecoder(self.tokenizer, job.skip_special_tokens)
        stops = StopMatcher(job.stops, job.include_stop)
        finish = None
        handle = choice.handle
        echo = job.echo  # the prompt comes first, once the engine has scored it (by its first token or its end)
        async for token in handle:
            if echo:
                yield self._echo(job, choice)
                echo = False
            if job.first_token is None:
                job.first_token = time.perf_counter()
                self.metrics.time_to_first_token.observe(job.first_token - job.started)
            choice.completion_tokens += 1
            k = choice.completion_tokens - 1
            scored = (self._scored(choice, token, handle.logprobs[k], handle.top_logprobs[k]) if choice.logprobs
                      else None)
            stop_token = token in job.stop_token_ids
            if stop_token and not job.include_stop:
                finish = "stop"
                self._file(choice, scored, choice.splitter is not None and choice.splitter.in_reasoning)
                break
            piece = self._token_piece(choice, stops.feed(decoder.add(token)), scored)
            if piece is not None:
                yield piece
            if stops.stopped or stop_token:
                finish = "stop"
                break
        else:
            if handle.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"generation ended early ({handle.finish_reason}): the server is stopping")
            finish = handle.finish_reason
        if echo:
            yield self._echo(job, choice)
        tail = "" if stops.stopped else stops.feed(decoder.flush())
        tail += "" if stops.stopped else stops.flush()
        reasoning, content = ("", tail) if choice.splitter is None else _joined(choice.splitter.feed(tail),
                                                                                 choice.splitter.flush())
        calls = []
        if choice.tools is not None:
            (content, calls), (rest, more) = choice.tools.feed(content), choice.tools.flush()
            content, calls = content + rest, calls + more
            if finish == "stop" and choice.tools.calls:
                finish = "tool_calls"
        tail_piece = self._text_piece(choice, reasoning, content, calls=calls)
        if tail_piece is not None:
            yield tail_piece
        choice.finish_reason, choice.stop_sequence = finish, stops.matched
        yield self._text_piece(choice, "", "", finish)

    def _echo(self, job: Job, choice: Choice) -> Piece:
        """The prompt, echoed at the start of a text completion (with its tokens' log-probs when asked)."""
        handle, ids = choice.handle, job.prompts[choice.prompt]
        if choice.logprobs:
            for token, logprob, top in zip(ids, handle.prompt_logprobs, handle.prompt_top_logprobs):
                choice.content_logprobs.append(self._scored(choice, token, logprob, top))
        return self._text_piece(choice, "", job.prompt_texts[choice.prompt], always=True)

    def _scored(self, choice: Choice, token: int, logprob: float | None, top) -> Scored:
        text = self.tokenizer.decode([token])
        entry = Scored(text, logprob, None if top is None else [(self.tokenizer.decode([t]), v) for t, v in top],
                       choice.offset)
        choice.offset += len(text)
        return entry

    @staticmethod
    def _file(choice: Choice, scored: Scored | None, reasoning: bool) -> None:
        if scored is not None:
            (choice.reasoning_logprobs if reasoning else choice.content_logprobs).append(scored)

    def _token_piece(self, choice: Choice, text: str, scored: Scored | None) -> Piece | None:
        """One generated token's text (split into reasoning and answer) and log-prob."""
        splitter = choice.splitter
        if splitter is None:
            reasoning, content, in_reasoning = "", text, False
        else:
            was_reasoning = splitter.in_reasoning
            reasoning, content = splitter.feed(text)
            in_reasoning = was_reasoning or splitter.in_reasoning
        choice.reasoning_tokens += in_reasoning
        self._file(choice, scored, in_reasoning)
        calls = []
        if choice.tools is not None and content:
            content, calls = choice.tools.feed(content)
        return self._text_piece(choice, reasoning, content, calls=calls)

    @staticmethod
    def _text_piece(choice: Choice, reasoning: str, content: str, finish: str | None = None,
                    always: bool = False, calls: list[ToolCall] = ()) -> Piece | None:
        """Record text on the choice; a Piece with it (and the tool calls just parsed) and the log-probs not yet
        sent, or None when it has nothing and no finish (the log-probs then wait for the next Piece)."""
        choice.reasoning.append(reasoning)
        choice.content.append(content)
        if not (reasoning or content or calls or finish or always):
            return None
        sent_reasoning, sent_content = choice.sent_logprobs
        choice.sent_logprobs = (len(choice.reasoning_logprobs), len(choice.content_logprobs))
        return Piece(choice.index, reasoning, content, finish,
                     choice.reasoning_logprobs[sent_reasoning:] if choice.logprobs else None,
                     choice.content_logprobs[sent_content:] if choice.logprobs else None, list(calls))


def _template_message(message, index: int) -> dict:
    """One request message as an OpenAI message dict for the template: developer is system, an earlier answer
    loses its reasoning, assistant tool calls and a tool result's call id come along."""
    text = message.text()
    if message.role == "assistant":
        text = strip_reasoning(text)
    out = {"role": "system" if message.role == "developer" else message.role, "content": text}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.role == "tool":
        if message.tool_call_id is None:
            raise APIError(400, "a tool message needs the tool_call_id it answers",
                           param=f"messages[{index}].tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    return out


def _joined(*pairs: tuple[str, str]) -> tuple[str, str]:
    return "".join(r for r, _ in pairs), "".join(c for _, c in pairs)


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
                quantize: str = "none", group_size: int = 32, adapter: str | None = None, prefix_cache: bool = True,
                speculative: str | None = None, num_speculative_tokens: int = 1, compile: bool = False,
                cuda_graphs: bool = False, adapters: dict[str, str] | None = None):
    """The model (in `dtype`, maybe weight-only quantised, maybe with a PEFT LoRA `adapter` on top, maybe with
    several `adapters` {name: directory} chosen per request: multi_lora.py), its tokenizer and an Engine on it
    (with prefix caching unless `prefix_cache` is False; with MTP speculative decoding when `speculative="mtp"`;
    its decode step compiled with `compile`, replayed as CUDA graphs with `cuda_graphs`): what both `serve` and
    `chat` run on."""
    if adapter is not None and adapters:
        raise ValueError("adapter (one on top of the model) and adapters (several beside it) exclude each other")
    directory = resolve(model_dir)  # a hub id is downloaded here, before serving: the only network access
    model = load(directory, dtype=dtype, device=device, quantize=quantize, group_size=group_size, adapter=adapter)
    if adapters:
        load_adapters(model, {name: resolve(path) for name, path in adapters.items()})
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_model_len,
                    prefix_cache_tokens=None if prefix_cache else 0, speculative=speculative,
                    num_speculative_tokens=num_speculative_tokens, compile=compile, cuda_graphs=cuda_graphs)
    return engine, Tokenizer.from_dir(directory)
