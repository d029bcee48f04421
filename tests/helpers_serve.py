"""A tiny real model whose greedy (and, practically, sampled) output is known in advance, and a live server on it.

The model is an ordinary openseek Model (one llama-style layer) whose weights make it a lookup table: the
embedding is the identity, attention and MLP write nothing back (o_proj = down_proj = 0), so the final hidden
state is the current token's one-hot vector and `lm_head[:, t]` picks the next token. Logit margins are ~40, so
even temperature 2 follows the table. Served through the real tokenizer and Engine, it answers every chat with
a known reasoning block and a known answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REASONING = "Summing both numbers gives four"
ANSWER = "The answer is 4."
LOOP_PROMPT = "Say forever"  # /v1/completions: " forever" follows itself until max_tokens
COIN_PROMPT = "Toss a coin"  # /v1/completions: " coin" is followed by " heads" or " tails", 50/50, then EOS
HIDDEN = 384  # = vocab size of the model, so the embedding can be the identity
CONTEXT = 256
MARGIN = 2.0  # lm_head entry; the logit is MARGIN * sqrt(HIDDEN) ≈ 39 for the scripted successor, 0 for others


def build_tokenizer(chat_template: str | None = None, answer: str = ANSWER):
    """A byte-level BPE with R1's special tokens; the R1 chat template (which prefills `<think>`) by default."""
    from openseek.tokenizer import train_bpe

    corpus = [f"{REASONING}</think>{answer} {LOOP_PROMPT} {COIN_PROMPT} heads tails Hello hi"] * 50
    return train_bpe(corpus, vocab_size=360, chat_template=chat_template)


def _script(tokenizer, answer: str) -> dict[int, list[int]]:
    """token id -> the ids that may follow it."""
    newline = tokenizer.encode("\n")
    assert len(newline) == 1
    reply = tokenizer.encode(f"{REASONING}</think>{answer}") + [tokenizer.eos_token_id]
    opening = [tokenizer.token_to_id(t) for t in ("<｜Assistant｜>", "<think>")]
    # The R1 template ends the prompt with "<think>\n"; after a template that stops at <｜Assistant｜>, the
    # model writes "<think>\n" itself. Either way the same reply follows.
    chain = opening + newline + reply
    assert len(set(chain)) == len(chain), f"the scripted reply repeats a token: {chain}"
    follows = {a: [b] for a, b in zip(chain, chain[1:])}
    forever = tokenizer.encode(LOOP_PROMPT)[-1]
    coin = tokenizer.encode(COIN_PROMPT)[-1]
    heads, tails = tokenizer.encode(" heads"), tokenizer.encode(" tails")
    assert len(heads) == len(tails) == 1 and not {forever, coin} & set(follows)
    follows[forever] = [forever]
    follows[coin] = heads + tails
    for side in heads + tails:
        follows[side] = [tokenizer.eos_token_id]
    return follows


def build_model(tokenizer, context: int = CONTEXT, answer: str = ANSWER):
    from openseek import Model, ModelConfig

    assert tokenizer.vocab_size <= HIDDEN
    cfg = ModelConfig(model_type="llama", vocab_size=HIDDEN, hidden_size=HIDDEN, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=context, eos_token_id=[tokenizer.eos_token_id],
                      bos_token_id=tokenizer.bos_token_id)
    model = Model(cfg).eval()
    head = torch.zeros(HIDDEN, HIDDEN)
    for token, successors in _script(tokenizer, answer).items():
        head[successors, token] = MARGIN
    unscripted = head.sum(0) == 0
    head[tokenizer.eos_token_id, unscripted] = MARGIN  # anything else ends the reply
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.eye(HIDDEN))
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(head)
    return model


def save_model_dir(directory: Path, context: int = CONTEXT, chat_template: str | None = None,
                   answer: str = ANSWER) -> Path:
    """The scripted model (answering `answer` after REASONING) and its tokenizer, saved in `directory`."""
    import openseek

    tokenizer = build_tokenizer(chat_template, answer)
    openseek.save(build_model(tokenizer, context, answer), directory)
    tokenizer.save(directory)
    return directory


def metrics(url: str, headers=None) -> dict[str, float]:
    """/metrics (Prometheus text) as {series: value}."""
    import httpx

    text = httpx.get(url + "/metrics", headers=headers).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loaded into the server process: Python's audit hooks see every socket it opens towards anything.
NETWORK_AUDIT = """
import sys
_log = open({path!r}, "a", buffering=1)
_log.write("audit on\\n")

def _audit(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        _log.write(f"{{event}} {{args[1]!r}}\\n")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname"):
        _log.write(f"{{event}} {{args[0]!r}}\\n")

sys.addaudithook(_audit)
"""


class LiveServer:
    """`openseek serve` in a subprocess on a free loopback port (the same command a user runs).

    With `audit_network`, the process logs every outbound socket operation to `self.network_log`.
    """

    def __init__(self, model_dir: Path, *flags: str, env: dict | None = None, audit_network: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        command = [sys.executable, "-m", "openseek.cli", "serve", "--model", str(model_dir),
                   "--port", str(self.port), "--served-model-name", "tiny", *flags]
        self.log = open(model_dir.parent / f"serve-{self.port}.log", "w+")
        env = dict(env or {})
        self.network_log = None
        if audit_network:
            site = model_dir.parent / f"audit-{self.port}"
            site.mkdir()
            self.network_log = site / "network.log"
            (site / "sitecustomize.py").write_text(NETWORK_AUDIT.format(path=str(self.network_log)))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        # One intra-op thread: on a busy 2-core machine, torch's spinning worker threads fight the engine and
        # event-loop threads and a 1 ms decode step can take 50 ms.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class InProcessServer:
    """uvicorn in a thread of this process, for tests that need the app object at hand."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)



# A Qwen2.5-style chat template with tool calling (tools in the system turn, calls in <tool_call> tags, results as
# <tool_response> user turns), written the way Qwen's own is: the kind of template `tools=` is rendered through.
TOOLS_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def save_random_model_dir(directory: Path, chat_template: str | None = TOOLS_CHAT_TEMPLATE, seed: int = 0,
                          added_tokens: list[str] = ()) -> Path:
    """A tiny llama with random weights (it writes nothing sensible: only a constraint makes its output valid) and
    the scripted model's tokenizer (plus `added_tokens`, kept by decoding), saved in `directory`."""
    import openseek
    from openseek import Model, ModelConfig

    tokenizer = build_tokenizer(chat_template)
    tokenizer.tokenizer.add_tokens(list(added_tokens))
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=[tokenizer.eos_token_id], bos_token_id=tokenizer.bos_token_id)
    openseek.save(Model(cfg).eval(), directory)
    tokenizer.save(directory)
    return directory
