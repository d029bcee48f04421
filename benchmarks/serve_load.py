"""Claim: `openseek serve` holds under load and hostile input: 64 concurrent clients for 60 s, each sending a random
mix of valid requests (chat and text completions, streamed and not, log-probs and echo, JSON schemas, required tool
calls, clients that hang up mid-answer) and invalid ones (broken JSON, lone surrogates, unknown models and fields,
bad types, prompts past the context, oversized bodies) get zero 5xx, zero hung requests, and the server's resident
memory at the end is within 1.2x of what it was after the warm-up.

The server is a real `openseek serve` process (loopback only) on a tiny random-weight llama with a tool-calling
template (tests/helpers_serve.py builds it); the clients are asyncio tasks of this process. A request "hangs" when
it has no answer within --request-timeout seconds; the hang-ups the mix makes on purpose are counted apart.

    .venv/bin/python benchmarks/serve_load.py [--clients 64] [--seconds 60] [--warmup 10] [--seed 0]

Prints one line per 10 s and a final JSON summary line (which tests/test_serve_faults.py reads for its short run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers_serve import LiveServer, save_random_model_dir  # noqa: E402

MODEL = "tiny"
ASK = [{"role": "user", "content": "Hello"}]
CARD = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                       "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                   "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}}]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": ASK, "max_tokens": 16} | fields


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello hi", "max_tokens": 8} | fields


def random_json(rng: random.Random, depth: int = 0):
    """Any JSON value, nested a little: what a fuzzing client sends in place of a field."""
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, -(2**70), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, 3.14])
    if kind == "str":
        return rng.choice(["", "x", "\x00", "\ud800", "é" * 50, "</think>", "<tool_call>", "{"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["model", "messages", "role", "content", "n", "a"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def request_mix(rng: random.Random, vocab: int, context: int):
    """One request at random: (name, method, path, body: dict | bytes | None, expectation, stream, hang up).
    The expectation: "ok" answers 2xx (or 429 when the server is full), "bad" a 4xx, "any" anything but a 5xx;
    "hangup" is a client leaving on purpose. Each entry of the menu: (name, weight, make)."""
    choices = [
        ("chat", 10, lambda: ("POST", "/v1/chat/completions",
                              chat(n=rng.randint(1, 3), temperature=rng.choice([0, 0.7, 1.5]),
                                   max_tokens=rng.randint(1, 24)), "ok", False, False)),
        ("chat-stream", 8, lambda: ("POST", "/v1/chat/completions",
                                    chat(stream=True, stream_options={"include_usage": True}), "ok", True, False)),
        ("completion-echo", 6, lambda: ("POST", "/v1/completions",
                                        completion(echo=True, logprobs=2, max_tokens=rng.randint(0, 6)), "ok", False,
                                        False)),
        ("completion-ids", 5, lambda: ("POST", "/v1/completions",
                                       completion(prompt=[[rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
                                                          for _ in range(rng.randint(1, 4))]), "ok", False, False)),
        ("json-schema", 4, lambda: ("POST", "/v1/chat/completions",
                                    chat(max_tokens=60, response_format={
                                        "type": "json_schema", "json_schema": {"name": "card", "schema": CARD}}),
                                    "ok", rng.random() < 0.5, False)),
        ("tool-required", 4, lambda: ("POST", "/v1/chat/completions",
                                      chat(max_tokens=60, tools=TOOLS, tool_choice="required"), "ok",
                                      rng.random() < 0.5, False)),
        ("vllm-fields", 3, lambda: ("POST", "/v1/chat/completions",
                                    chat(ignore_eos=True, stop_token_ids=[rng.randrange(vocab)],
                                         include_stop_str_in_output=True, skip_special_tokens=False), "ok", False,
                                    False)),
        ("stream-hangup", 4, lambda: ("POST", "/v1/chat/completions", chat(stream=True, max_tokens=200), "hangup",
                                      True, True)),
        ("whole-hangup", 3, lambda: ("POST", "/v1/chat/completions", chat(max_tokens=200), "hangup", False, True)),
        ("health", 2, lambda: ("GET", rng.choice(["/health", "/v1/models", "/metrics"]), None, "ok", False, False)),
        ("tokenize", 2, lambda: ("POST", "/tokenize", {"model": MODEL, "prompt": "Hello hi"}, "ok", False, False)),
        # invalid requests
        ("broken-json", 3, lambda: ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', "bad", False,
                                    False)),
        ("lone-surrogate", 3, lambda: ("POST", "/v1/chat/completions",
                                       b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udcff"}]}',
                                       "bad", False, False)),
        ("unknown-model", 2, lambda: ("POST", "/v1/chat/completions", chat(model="gpt-9"), "bad", False, False)),
        ("negative-max", 2, lambda: ("POST", "/v1/completions", completion(max_tokens=-1), "bad", False, False)),
        ("past-context", 2, lambda: ("POST", "/v1/completions", completion(prompt=[1] * (context + 5)), "bad", False,
                                     False)),
        ("stop-id-outside", 2, lambda: ("POST", "/v1/chat/completions", chat(stop_token_ids=[vocab + 7]), "bad",
                                        False, False)),
        ("unhonoured-field", 2, lambda: ("POST", "/v1/chat/completions", chat(logit_bias={"5": 3}), "bad", False,
                                         False)),
        ("bad-schema", 2, lambda: ("POST", "/v1/chat/completions", chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}), "bad", False, False)),
        ("too-many-n", 2, lambda: ("POST", "/v1/chat/completions", chat(n=1000), "bad", False, False)),
        ("oversized", 1, lambda: ("POST", "/v1/chat/completions", chat(messages=[
            {"role": "user", "content": "x" * (1 << 21)}]), "bad", False, False)),
        ("fuzzed-field", 4, lambda: ("POST", rng.choice(["/v1/chat/completions", "/v1/completions"]),
                                     chat() | {rng.choice(["messages", "n", "stop", "seed", "tools", "tool_choice",
                                                           "top_p", "logprobs", "prompt", "max_tokens"]):
                                               random_json(rng)}, "any", rng.random() < 0.3, False)),
    ]
    names, weights = zip(*[(c[0], c[1]) for c in choices])
    name = rng.choices(names, weights)[0]
    return (name, *dict((c[0], c[2]) for c in choices)[name]())


class Tally:
    def __init__(self):
        self.status = Counter()
        self.by_name = Counter()
        self.server_errors: list[str] = []
        self.unexpected: list[str] = []
        self.hung: list[str] = []
        self.transport_errors: list[str] = []
        self.hangups = 0

    def summary(self) -> dict:
        return {"requests": sum(self.status.values()) + self.hangups, "hangups": self.hangups,
                "status": dict(sorted(self.status.items())), "server_errors": len(self.server_errors),
                "hung": len(self.hung), "transport_errors": len(self.transport_errors),
                "unexpected": len(self.unexpected),
                "examples": (self.server_errors + self.hung + self.transport_errors + self.unexpected)[:5]}


async def one(client: httpx.AsyncClient, tally: Tally, rng: random.Random, vocab: int, context: int,
              timeout: float) -> None:
    name, method, path, body, expect, stream, hang_up = request_mix(rng, vocab, context)
    if body is None:
        kwargs = {}
    else:  # json.dumps escapes a lone surrogate as JSON may; httpx's encoder would refuse it
        kwargs = {"content": body if isinstance(body, bytes) else json.dumps(body).encode(),
                  "headers": {"content-type": "application/json"}}
    started = time.perf_counter()
    try:
        if hang_up:  # leave after the first chunk (streamed) or before any answer (not streamed)
            if stream:
                async with client.stream(method, path, timeout=timeout, **kwargs) as response:
                    async for _ in response.aiter_bytes():
                        break
            else:
                try:
                    await client.request(method, path, timeout=0.3, **kwargs)
                except httpx.TimeoutException:
                    pass
            tally.hangups += 1
            return
        if stream:
            async with client.stream(method, path, timeout=timeout, **kwargs) as response:
                text = (await response.aread()).decode(errors="replace")
                status = response.status_code
        else:
            response = await client.request(method, path, timeout=timeout, **kwargs)
            status, text = response.status_code, response.text
    except httpx.TimeoutException:
        tally.hung.append(f"{name}: no answer in {time.perf_counter() - started:.0f} s")
        return
    except httpx.HTTPError as e:
        tally.transport_errors.append(f"{name}: {type(e).__name__}: {e}")
        return
    tally.status[status] += 1
    tally.by_name[name] += 1
    if status >= 500:
        tally.server_errors.append(f"{name} -> {status}: {text[:200]}")
    elif expect == "ok" and not (200 <= status < 300 or status == 429):
        tally.unexpected.append(f"{name} -> {status}: {text[:200]}")
    elif expect == "bad" and not 400 <= status < 500:
        tally.unexpected.append(f"{name} -> {status} (expected a 4xx): {text[:200]}")
    elif stream and status == 200 and "internal error" in text:  # an error inside a stream is a 500 in disguise
        tally.server_errors.append(f"{name}: stream carried {text[-200:]}")


async def client_loop(url: str, tally: Tally, seed: int, until: float, vocab: int, context: int, timeout: float):
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url) as client:
        while time.perf_counter() < until:
            await one(client, tally, rng, vocab, context, timeout)


async def hammer(server: LiveServer, clients: int, seconds: float, warmup: float, seed: int, vocab: int,
                 context: int, timeout: float) -> dict:
    tally = Tally()
    start = time.perf_counter()
    until = start + seconds
    loops = [asyncio.create_task(client_loop(server.url, tally, seed * 1000 + i, until, vocab, context, timeout))
             for i in range(clients)]
    rss = {"start_mib": server.rss_bytes() / 2**20}
    samples = []
    while not all(loop.done() for loop in loops):
        await asyncio.sleep(1)
        elapsed = time.perf_counter() - start
        samples.append(server.rss_bytes() / 2**20)
        if "warm_mib" not in rss and elapsed >= warmup:
            rss["warm_mib"] = samples[-1]
        if int(elapsed) % 10 == 0:
            print(f"{elapsed:5.0f} s: {sum(tally.status.values()) + tally.hangups} requests, "
                  f"RSS {samples[-1]:.0f} MiB, 5xx {len(tally.server_errors)}, hung {len(tally.hung)}",
                  file=sys.stderr, flush=True)
    await asyncio.gather(*loops)
    rss["end_mib"] = server.rss_bytes() / 2**20
    rss["peak_mib"] = max(samples + [rss["end_mib"]])
    rss.setdefault("warm_mib", rss["start_mib"])
    health = httpx.get(server.url + "/health", timeout=10).status_code
    return tally.summary() | {"clients": clients, "seconds": seconds, "health_after": health,
                              "rss": {k: round(v, 1) for k, v in rss.items()},
                              "rss_end_over_warm": round(rss["end_mib"] / rss["warm_mib"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model_dir(Path(tmp) / "random")
        config = json.loads((model_dir / "config.json").read_text())
        vocab, context = config["vocab_size"], config["max_position_embeddings"]
        server = LiveServer(model_dir, "--max-n", "4", "--max-sequences", "64")
        try:
            summary = asyncio.run(hammer(server, args.clients, args.seconds, args.warmup, args.seed, vocab, context,
                                         args.request_timeout))
        finally:
            server.stop()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
