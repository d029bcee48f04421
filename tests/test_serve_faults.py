"""The server under faults: a request whose prefill raises fails alone, an error later in a step fails only that
step's requests and the engine serves on, a serving loop that cannot go on turns /health and new requests into 503s,
and a client that hangs up frees its slot at the next step. The server runs in this process (uvicorn in a thread),
so the tests can inject faults into the engine and hold its model lock to line its steps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest

from helpers_serve import ANSWER, COIN_PROMPT, LOOP_PROMPT, InProcessServer, metrics, save_model_dir
from openseek.engine.batch import Batch
from openseek.engine.prefix import PrefixCache

HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A 4096-token context: a looping completion then holds its row for seconds, not milliseconds."""
    return save_model_dir(tmp_path_factory.mktemp("faults-long") / "tiny", context=4096)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from openseek.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@contextlib.contextmanager
def serving(model_dir, max_batch_size: int = 8):
    """The app on its own Engine, served by uvicorn in a thread: yields (the Server, its URL)."""
    from openseek.serve.app import create_app
    from openseek.serve.server import ServeConfig, load_engine

    engine, tokenizer = load_engine(str(model_dir), max_batch_size=max_batch_size)
    # one decode step loads the matmul kernel (built on a machine's first run, in about a minute) before any client
    # timeout starts counting
    engine.generate([tokenizer.encode(LOOP_PROMPT)], 1)
    app = create_app(engine, tokenizer, ServeConfig(model_name="tiny", max_model_len=engine.max_seq_len))
    live = InProcessServer(app.state.asgi)
    try:
        yield app.state.server, live.url
    finally:
        live.stop()  # its shutdown closes the server and the engine


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds: a hang guard, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting, after {timeout} s, for {what}")
        time.sleep(0.005)


async def reached(condition, what: str, timeout: float = 10.0) -> None:
    """`wait_until` for a coroutine: the event loop keeps running the requests meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting, after {timeout} s, for {what}")
        await asyncio.sleep(0.005)


async def streamed(http: httpx.AsyncClient, body: dict) -> dict:
    """One streamed text completion: its text, finish reason and completion tokens, or the error it ended with."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, tokens = "", None, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return {"error": event["error"]["message"]}
            for choice in event["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"text": text, "finish_reason": finish, "completion_tokens": tokens}


async def one_then_seven(server, url: str, bodies: list[dict]) -> list[dict]:
    """Stream 8 completions so that the engine admits the first alone and the other 7 together, in one prefill
    (its model lock is held until all 7 wait, so no step runs before)."""
    engine = server.engine
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        with engine._model_lock:
            first = asyncio.create_task(streamed(http, bodies[0]))
            await reached(lambda: server.in_flight == 1 and not engine._queue, "the first request to be taken")
            rest = [asyncio.create_task(streamed(http, body)) for body in bodies[1:]]
            await reached(lambda: len(engine._queue) == 7, "the other 7 requests to wait for a step")
        return await asyncio.gather(first, *rest)


def test_a_prefill_that_raises_fails_only_its_own_request_among_8_streams(model_dir, tokenizer, monkeypatch,
                                                                          one_thread):
    loop = tokenizer.encode(LOOP_PROMPT)  # " forever" follows itself until max_tokens
    (marker,) = tokenizer.encode(" tails")
    assert marker not in loop
    faulty = 5
    bodies = [{"model": "tiny", "prompt": [marker, *loop] if i == faulty else loop, "max_tokens": 3 + i,
               "temperature": 0} for i in range(8)]
    failed_prefills = []
    real_admit = Batch.admit

    def admit_failing_on_the_marker(batch, prompts, src, *args, **kwargs):
        if any(marker in prompts[i] for i in src):
            failed_prefills.append(len(src))
            raise RuntimeError("injected prefill fault: the prompt holds the marker token")
        return real_admit(batch, prompts, src, *args, **kwargs)

    with serving(model_dir) as (server, url):
        unfaulted = asyncio.run(one_then_seven(server, url, bodies))
        monkeypatch.setattr(Batch, "admit", admit_failing_on_the_marker)
        faulted = asyncio.run(one_then_seven(server, url, bodies))
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert metrics(url)["openseek_sequences_in_flight"] == 0
    assert [r["text"] for r in unfaulted] == [" forever" * (3 + i) for i in range(8)]
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 3 + i for i, r in enumerate(unfaulted))
    assert failed_prefills == [7, 1]  # the 7 admitted together failed; alone, only the faulty one did
    assert faulted[faulty] == {"error": "generation failed: RuntimeError: injected prefill fault: the prompt holds "
                                        "the marker token"}
    assert [r for i, r in enumerate(faulted) if i != faulty] == [r for i, r in enumerate(unfaulted) if i != faulty]


def test_a_fault_after_the_decode_fails_that_step_and_the_server_serves_on(model_dir, tokenizer, monkeypatch,
                                                                           one_thread):
    """The prefix-cache save of a finished sequence runs out of memory: the request that finished has its answer,
    the one running beside it fails with the error, and the engine goes on serving."""
    sides = {*tokenizer.encode(" heads"), *tokenizer.encode(" tails")}  # what follows COIN_PROMPT, then EOS
    real_save = PrefixCache.save

    def save_out_of_memory(cache, token_ids, *args):
        if sides & set(token_ids):  # only a finished coin toss holds one: prompts never do
            raise MemoryError("injected: no memory left to keep a finished sequence")
        return real_save(cache, token_ids, *args)

    long = {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": 200, "temperature": 0}
    toss = {"model": "tiny", "prompt": COIN_PROMPT, "max_tokens": 4, "temperature": 0}

    async def toss_beside_a_long_stream(server, url):
        engine = server.engine
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            with engine._model_lock:  # the toss joins the long stream's batch a step after it
                running = asyncio.create_task(streamed(http, long))
                await reached(lambda: server.in_flight == 1 and not engine._queue, "the long stream to be taken")
                tossed = asyncio.create_task(http.post("/v1/completions", json=toss))
                await reached(lambda: len(engine._queue) == 1, "the toss to wait for a step")
            return await running, await tossed

    with serving(model_dir) as (server, url):
        monkeypatch.setattr(PrefixCache, "save", save_out_of_memory)
        running, tossed = asyncio.run(toss_beside_a_long_stream(server, url))
        assert running == {"error": "generation failed: MemoryError: injected: no memory left to keep a finished "
                                    "sequence"}
        assert tossed.status_code == 200
        assert tossed.json()["choices"][0]["text"] in (" heads", " tails")
        assert tossed.json()["choices"][0]["finish_reason"] == "stop"
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
        after = httpx.post(url + "/v1/chat/completions", json=HELLO, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == ANSWER
        assert server.engine._thread.is_alive() and server.engine.failure is None


class LoopBreaker(BaseException):
    """Gets past `except Exception`, as a SystemExit from a library or a bug in the failure path would: the serving
    loop cannot go on."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies loudly
def test_when_the_serving_loop_breaks_health_and_new_requests_answer_503_at_once(model_dir, monkeypatch, one_thread):
    def step_breaking_the_loop(batch, *args):
        raise LoopBreaker("injected: the serving loop breaks")

    with serving(model_dir) as (server, url):
        monkeypatch.setattr(Batch, "step", step_breaking_the_loop)
        running = httpx.post(url + "/v1/chat/completions", json=HELLO, timeout=10)
        assert running.status_code == 500
        assert running.json()["error"]["message"] == ("generation failed: RuntimeError: the engine's serving thread "
                                                      "stopped on an error: LoopBreaker('injected: the serving loop "
                                                      "breaks')")
        server.engine._thread.join(timeout=10)  # it ends just after failing its requests
        assert not server.engine._thread.is_alive()
        # the failure is recorded before the running request fails: no waiting, from now on every answer is a 503
        for response in (httpx.get(url + "/health", timeout=5),
                         httpx.post(url + "/v1/chat/completions", json=HELLO, timeout=5),
                         httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hi"}, timeout=5)):
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["type"] == "service_unavailable_error"
            assert "LoopBreaker('injected: the serving loop breaks')" in error["message"]


def raw_completion(url: str, body: dict) -> socket.socket:
    """POST /v1/completions on a bare socket, which the test closes to hang up (no client library in between)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return connection


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_hanging_up_frees_its_slot_at_the_next_step(long_model_dir, monkeypatch, one_thread, stream):
    with serving(long_model_dir, max_batch_size=2) as (server, url):
        engine, handles = server.engine, []
        submit = engine.submit

        def recorded_submit(*args, **kwargs):
            handles.append(submit(*args, **kwargs))
            return handles[-1]

        monkeypatch.setattr(engine, "submit", recorded_submit)
        connection = raw_completion(url, {"model": "tiny", "prompt": LOOP_PROMPT, "max_tokens": 4000,
                                          "temperature": 0, "stream": stream})
        wait_until(lambda: handles and handles[0].token_ids, "the request to generate")
        (handle,) = handles
        with engine._model_lock:  # no step runs until the server has seen the hang-up
            connection.close()
            wait_until(lambda: handle.cancelled, "the server to cancel the request of the client that hung up")
            produced = len(handle.token_ids)
        cancelled = handle.result(timeout=10)
        assert cancelled.finish_reason == "cancelled"
        assert len(cancelled.token_ids) <= produced + 1  # the step that was streaming when the lock was taken
        wait_until(lambda: metrics(url)["openseek_sequences_running"] == 0, "the engine to free the row")
        values = metrics(url)
        assert values["openseek_sequences_in_flight"] == 0
        assert values["openseek_requests_cancelled_total"] == 1
        status = 200 if stream else 499  # a stream has sent its headers; a whole answer had nothing sent yet
        assert values[f'openseek_requests_total{{route="/v1/completions",status="{status}"}}'] == 1
        after = httpx.post(url + "/v1/chat/completions", json=HELLO, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == ANSWER
        assert metrics(url)["openseek_requests_cancelled_total"] == 1  # an answer sent whole is no cancellation


def test_a_short_load_of_mixed_valid_and_hostile_requests_gets_no_5xx_and_no_hang():
    """benchmarks/serve_load.py as a user runs it, shortened (the 64 clients x 60 s figures are in the notes): every
    request answered, valid ones 2xx or 429, invalid ones 4xx, none 5xx, the server healthy afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
    run = subprocess.run([sys.executable, str(script), "--clients", "12", "--seconds", "6", "--warmup", "2",
                          "--request-timeout", "30"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["server_errors"], summary["hung"], summary["transport_errors"], summary["unexpected"]) == \
        (0, 0, 0, 0), summary["examples"]
    assert summary["health_after"] == 200
    assert summary["requests"] > 100 and summary["hangups"] > 0
    assert {s for s in summary["status"] if s.startswith("4")} >= {"400", "404", "413", "422"}
