"""The Engine against transformers' generate and against repeated full forward passes; caches, sampling, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math

import pytest
import torch

import openseek
from openseek.engine.cache import Cache, make_cache
from openseek.engine.sampling import Sampler, SamplingParams


KINDS = ["qwen2", "llama", "deepseek_v3", "deepseek_v3_yarn", "deepseek_v3_lite", "deepseek_v3_wide"]
PROMPTS = [[5, 17, 33, 2, 60, 71, 8], [40, 3], [11], [90, 12, 45, 45, 7, 1, 2, 3, 4, 5, 6, 70]]  # ragged, one of 1


@pytest.fixture(scope="module")
def models(saved_hf_models):
    """kind -> (openseek model loaded from the saved checkpoint, the transformers model), built once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            directory, hf = saved_hf_models(kind)
            built[kind] = openseek.load(directory), hf
        return built[kind]

    return get


def greedy_by_full_forward(model, prompt, steps):
    """Reference decoding without any cache: re-run the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_transformers_generate(models, kind):
    ours, hf = models(kind)
    outs = openseek.Engine(ours).generate(PROMPTS, 10, temperature=0, stop_token_ids=[])
    for prompt, (out,) in zip(PROMPTS, outs):  # n = 1: a list of one Completion per prompt
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected
        assert out.finish_reason == "length" and out.logprobs is None


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_ragged_batch_equals_full_forward_and_each_prompt_alone(models, kind):
    ours, _ = models(kind)
    engine = openseek.Engine(ours)
    batch = engine.generate(PROMPTS, 10, temperature=0, stop_token_ids=[])
    for prompt, (out,) in zip(PROMPTS, batch):
        assert out.token_ids == greedy_by_full_forward(ours, prompt, 10)
        assert engine.generate([prompt], 10, temperature=0, stop_token_ids=[])[0][0].token_ids == out.token_ids


@pytest.mark.parametrize("kind", ["llama", "deepseek_v3_lite"])
def test_n_samples_and_small_batches_give_the_same_greedy_rows(models, kind):
    ours, _ = models(kind)
    whole = openseek.Engine(ours).generate(PROMPTS, 6, temperature=0, n=3, stop_token_ids=[])
    chunked = openseek.Engine(ours, max_batch_size=2).generate(PROMPTS, 6, temperature=0, n=3, stop_token_ids=[])
    for prompt, samples, again in zip(PROMPTS, whole, chunked):
        assert len(samples) == 3
        expected = greedy_by_full_forward(ours, prompt, 6)
        assert [s.token_ids for s in samples] == [expected] * 3 == [s.token_ids for s in again]


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_stop_tokens_end_rows_early_and_default_to_eos(models, kind, monkeypatch):
    """Rows stop at different steps (finished rows leave the batch); each equals its unstopped output cut at the
    first stop token, stop token included."""
    ours, _ = models(kind)
    compactions = []
    select_rows = Cache.select_rows

    def counting_select_rows(cache, keep):
        compactions.append(len(keep))
        select_rows(cache, keep)

    monkeypatch.setattr(Cache, "select_rows", counting_select_rows)
    engine = openseek.Engine(ours)
    prompts = [[i + 1, 2 * i + 3, 7] for i in range(8)]
    free = [o.token_ids for (o,) in engine.generate(prompts, 40, temperature=0, stop_token_ids=[])]
    counts = {}
    for row in free:
        for t in set(row[:20]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < len(prompts), counts[t]))  # in many rows but not all, if possible
    explicit = engine.generate(prompts, 40, temperature=0, stop_token_ids=[stop])
    original = ours.cfg
    try:
        ours.cfg = original.replace(eos_token_id=[stop])
        by_default = openseek.Engine(ours).generate(prompts, 40, temperature=0)  # None = the model's EOS ids
    finally:
        ours.cfg = original
    for outs in (explicit, by_default):
        stopped = 0
        for row, (out,) in zip(free, outs):
            if stop in row:
                stopped += 1
                assert out.token_ids == row[: row.index(stop) + 1] and out.finish_reason == "stop"
            else:
                assert out.token_ids == row and out.finish_reason == "length"
        assert stopped >= 2
    assert compactions  # finished rows really left the running batch


def test_kv_bytes_per_token_is_the_latent_formula_for_mla_and_kv_for_gqa(models):
    for kind in ("deepseek_v3", "deepseek_v3_lite", "qwen2"):
        ours, _ = models(kind)
        cfg = ours.cfg
        for dtype in (torch.float32, torch.bfloat16):
            engine = openseek.Engine(ours.to(dtype))
            size = 4 if dtype == torch.float32 else 2
            if cfg.uses_mla:
                expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * size
                assert expected == (16 + 8) * 3 * size
            else:
                expected = 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers * size
            assert engine.kv_bytes_per_token == expected
            cache = make_cache(cfg, rows=3, max_len=5, dtype=dtype, device=torch.device("cpu"))
            held = sum(b.numel() * b.element_size() for layer in cache.layers for b in layer.buffers())
            assert held == expected * 3 * 5  # the preallocated tensors cost exactly that per token
        ours.to(torch.float32)


def test_sampled_logprobs_are_the_temperature_scaled_full_vocab_logprobs(models):
    ours, _ = models("deepseek_v3")
    outs = openseek.Engine(ours).generate(PROMPTS[:2], 8, temperature=0.7, top_k=5, n=2, seed=3, logprobs=True,
                                          stop_token_ids=[])
    for prompt, samples in zip(PROMPTS, outs):
        for sample in samples:
            seq = torch.tensor([prompt + sample.token_ids])
            with torch.no_grad():
                logits = ours(seq)[0, len(prompt) - 1 : -1]
            expected = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
    greedy = openseek.Engine(ours).generate([PROMPTS[0]], 4, temperature=0, logprobs=True, stop_token_ids=[])[0][0]
    with torch.no_grad():
        logits = ours(torch.tensor([PROMPTS[0] + greedy.token_ids]))[0, len(PROMPTS[0]) - 1 : -1]
    assert greedy.logprobs == pytest.approx(logits.log_softmax(-1).max(-1).values.tolist(), abs=1e-4)


def test_seeded_samples_do_not_depend_on_the_thread_count(models):
    """Decode's attention is written out (ops.attend_grouped): SDPA's CPU kernel split the keys among threads
    for one query, so under --threads auto the same seed gave other log-probs from run to run."""
    ours, _ = models("qwen2")
    kwargs = dict(temperature=1.5, n=4, stop_token_ids=[], logprobs=True, seed=7)
    one, two = (openseek.Engine(ours, threads=t).generate(PROMPTS, 12, **kwargs) for t in (1, 2))
    assert [[s.logprobs for s in samples] for samples in one] == [[s.logprobs for s in samples] for samples in two]
    assert [[s.token_ids for s in samples] for samples in one] == [[s.token_ids for s in samples] for samples in two]


def test_seeded_sampling_is_reproducible(models):
    ours, _ = models("qwen2")
    engine = openseek.Engine(ours)
    kwargs = dict(temperature=1.5, n=4, stop_token_ids=[], logprobs=True)
    first = engine.generate(PROMPTS, 12, seed=7, **kwargs)
    again = engine.generate(PROMPTS, 12, seed=7, **kwargs)
    other = engine.generate(PROMPTS, 12, seed=8, **kwargs)
    ids = lambda outs: [[s.token_ids for s in samples] for samples in outs]  # noqa: E731
    assert ids(first) == ids(again)
    assert [[s.logprobs for s in samples] for samples in first] == [[s.logprobs for s in samples] for samples in again]
    assert ids(first) != ids(other)
    assert len({tuple(s.token_ids) for s in first[0]}) > 1  # the n samples of one prompt differ


def crafted_logits(rows):
    """Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on tokens 3, 0, 7, 1, 5 of a 10-token vocabulary (others ~0)."""
    probs = torch.full((10,), 1e-12)
    probs[[3, 0, 7, 1, 5]] = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    return probs.log().expand(rows, 10).clone()


@pytest.mark.parametrize(
    "params, allowed, shares",
    [
        (SamplingParams(1.0, top_k=2), {3, 0}, {3: 4 / 7, 0: 3 / 7}),
        (SamplingParams(1.0, top_p=0.8), {3, 0, 7}, {3: 0.4 / 0.85, 0: 0.3 / 0.85, 7: 0.15 / 0.85}),
        (SamplingParams(1.0, top_p=0.5), {3, 0}, {3: 4 / 7, 0: 3 / 7}),
        (SamplingParams(1.0, top_p=0.3), {3}, {3: 1.0}),
        (SamplingParams(1.0, top_k=3, top_p=0.9), {3, 0, 7}, {3: 0.4 / 0.85, 0: 0.3 / 0.85, 7: 0.15 / 0.85}),
        (SamplingParams(0.0, top_k=4), {3}, {3: 1.0}),
    ],
)
def test_top_k_and_top_p_never_sample_outside_their_set(params, allowed, shares):
    rows = 20000
    tokens, logprobs, _ = Sampler([params] * rows, torch.device("cpu"))(
        crafted_logits(rows), torch.Generator().manual_seed(0), want_logprobs=True
    )
    counts = torch.bincount(tokens, minlength=10)
    assert {i for i in range(10) if counts[i] > 0} == allowed
    for token, share in shares.items():
        assert counts[token].item() / rows == pytest.approx(share, abs=0.015)
    # log-probs are of the unfiltered distribution: log 0.4 for token 3 whatever the filter
    assert logprobs[tokens == 3][0].item() == pytest.approx(math.log(0.4), abs=1e-5)


def test_per_row_sampling_parameters_in_one_batch():
    params = [SamplingParams(0.0), SamplingParams(1.0, top_k=1), SamplingParams(1.0, top_p=0.5), SamplingParams(1.0)]
    tokens, _, _ = Sampler(params * 500, torch.device("cpu"))(crafted_logits(2000), torch.Generator().manual_seed(1))
    tokens = tokens.view(500, 4)
    assert (tokens[:, 0] == 3).all() and (tokens[:, 1] == 3).all()
    assert set(tokens[:, 2].tolist()) == {3, 0}
    assert set(tokens[:, 3].tolist()) == {3, 0, 7, 1, 5}


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 96]]), r"prompt 0 has token id 96 at index 1, outside the vocabulary \[0, 96\)"),
        (dict(prompts=[[-1]]), "token id -1"),
        (dict(prompts=[[1] * 200], max_new_tokens=57), r"200 tokens; with max_new_tokens=57 that is 257 > 256"),
        (dict(n=0), "n .* must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(prompts=[]), "non-empty list"),
        (dict(stop_token_ids=[500]), "stop token id 500"),
    ],
)
def test_bad_input_raises_value_error_with_the_reason(models, call, message):
    ours, _ = models("qwen2")
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | call
    with pytest.raises(ValueError, match=message):
        openseek.Engine(ours).generate(**args)


def test_generate_gives_the_caller_its_thread_count_back(models):
    ours, _ = models("qwen2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        engine = openseek.Engine(ours, threads=1)
        seen = []
        engine.threads.unit = _recording(engine.threads.unit, seen)
        engine.generate(PROMPTS, 3, temperature=0, stop_token_ids=[])
        assert seen and set(seen) == {1}  # the decode steps ran on the engine's count
        assert torch.get_num_threads() == 2  # the caller's own work runs on its own again
    finally:
        torch.set_num_threads(before)


def _recording(unit, seen):
    @contextlib.contextmanager
    def recorded():
        with unit():
            seen.append(torch.get_num_threads())
            yield
    return recorded


def test_generation_leaves_weights_and_training_mode_alone(models):
    ours, _ = models("deepseek_v3")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.train()
    openseek.Engine(ours).generate(PROMPTS, 5, temperature=1.0, seed=0)
    assert ours.training
    ours.eval()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


# ---- streaming / continuous batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_streaming_requests_join_and_leave_the_running_batch(models, kind):
    ours, _ = models(kind)
    engine = openseek.Engine(ours, max_batch_size=3)
    expected = [o.token_ids for (o,) in engine.generate(PROMPTS, 12, temperature=0, stop_token_ids=[])]
    streamed = [[] for _ in PROMPTS]
    try:
        first = engine.submit(PROMPTS[0], 12, temperature=0, stop_token_ids=[], on_token=streamed[0].append)
        while len(first.token_ids) < 3:  # the others arrive while the first is running
            first._done.wait(0.01)
        later = [engine.submit(p, 12 - i, temperature=0, stop_token_ids=[], on_token=streamed[i + 1].append)
                 for i, p in enumerate(PROMPTS[1:])]  # 4 requests, 3 rows: the last waits for a free row
        results = [r.result(timeout=60) for r in [first, *later]]
    finally:
        engine.close()
    for i, (result, tokens) in enumerate(zip(results, expected)):
        want = tokens if i == 0 else tokens[: 12 - (i - 1)]
        assert result.token_ids == want == streamed[i]
        assert result.finish_reason == "length"


def test_async_iteration_await_cancellation_and_stop(models):
    ours, _ = models("llama")
    engine = openseek.Engine(ours)
    expected = engine.generate([PROMPTS[0]], 20, temperature=0, stop_token_ids=[])[0][0].token_ids
    stop = expected[4]

    async def scenario():
        streamed = [t async for t in engine.submit(PROMPTS[0], 20, temperature=0, stop_token_ids=[])]
        stopped = await engine.submit(PROMPTS[0], 20, temperature=0, stop_token_ids=[stop], logprobs=True)
        long = engine.submit(PROMPTS[1], 200, temperature=0, stop_token_ids=[])
        got = []
        async for token in long:
            got.append(token)
            if len(got) == 3:
                long.cancel()
        return streamed, stopped, long.result(), got

    try:
        streamed, stopped, cancelled, got = asyncio.run(scenario())
    finally:
        engine.close()
    assert streamed == expected
    assert stopped.token_ids == expected[: expected.index(stop) + 1] and stopped.finish_reason == "stop"
    assert len(stopped.logprobs) == len(stopped.token_ids)
    assert cancelled.finish_reason == "cancelled" and 3 <= len(cancelled.token_ids) < 200
    assert got == cancelled.token_ids


def test_a_row_freed_between_running_ones_stays_parked_and_is_reused(models):
    """A request that ends while the rows around it run on leaves a hole: the hole must neither move along the cache
    (here it would run past max_seq_len) nor disturb its neighbours, and a later request takes it."""
    ours, _ = models("qwen2")
    engine = openseek.Engine(ours, max_batch_size=3, max_seq_len=48)
    jobs = [(PROMPTS[0], 40), ([7] * 40, 3), (PROMPTS[1], 40), (PROMPTS[3], 20)]  # the 40-token prompt ends first
    expected = [engine.generate([p], n, temperature=0, stop_token_ids=[])[0][0].token_ids for p, n in jobs]
    handles = []

    def submit_late(token):  # on the engine thread, long after the short request has left its row
        if len(handles[0].token_ids) == 20:
            handles.append(engine.submit(*jobs[3], temperature=0, stop_token_ids=[]))

    try:
        with engine._model_lock:  # nothing decodes before all three are queued: they take rows 0, 1, 2
            handles.append(engine.submit(*jobs[0], temperature=0, stop_token_ids=[], on_token=submit_late))
            handles += [engine.submit(*job, temperature=0, stop_token_ids=[]) for job in jobs[1:3]]
        results = [h.result(timeout=60) for h in handles[:3]]
        results.append(handles[3].result(timeout=60))
    finally:
        engine.close()
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["length"] * 4


def test_streaming_seeded_sampling_matches_and_bad_requests_raise(models):
    ours, _ = models("qwen2")
    engine = openseek.Engine(ours, max_seq_len=64)
    try:
        a = engine.submit(PROMPTS[0], 10, temperature=1.0, seed=11, stop_token_ids=[])
        b = engine.submit(PROMPTS[1], 10, temperature=1.0, stop_token_ids=[])
        c = engine.submit(PROMPTS[0], 10, temperature=1.0, seed=11, stop_token_ids=[])
        assert a.result(60).token_ids == c.result(60).token_ids and len(b.result(60).token_ids) == 10
        with pytest.raises(ValueError, match="max_seq_len"):
            engine.submit([1] * 60, 10)
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            engine.submit([1], 10, top_p=0)
        failing = engine.submit([1, 2], 5, on_token=lambda token: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(60)
        assert engine.submit([3], 4, stop_token_ids=[]).result(60).finish_reason == "length"  # still serving
    finally:
        engine.close()
    assert not engine._thread.is_alive()


# ---- log-probs for serving and eval; prefix caching ---------------------------------------------------------------


def reference_logprobs(model, tokens, temperature=1.0):
    """log_softmax(logits / temperature) at every position of one full forward: [len(tokens), V] (float64)."""
    with torch.no_grad():
        return (model(torch.tensor([tokens]))[0].double() / temperature).log_softmax(-1)


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_prompt_and_top_logprobs_are_the_log_softmax_of_one_full_forward(models, kind, temperature):
    ours, _ = models(kind)
    engine = openseek.Engine(ours, max_batch_size=4)
    try:
        handles = [engine.submit(p, 5, temperature=temperature, seed=3, stop_token_ids=[], logprobs=True,
                                 top_logprobs=4, prompt_logprobs=True) for p in PROMPTS]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.close()
    for prompt, result in zip(PROMPTS, results):
        sequence = prompt + result.token_ids
        ref = reference_logprobs(ours, sequence, temperature or 1.0)
        at = [ref[i - 1, t] for i, t in enumerate(sequence) if i > 0]  # each token given those before it
        assert result.prompt_logprobs[0] is None and result.prompt_top_logprobs[0] is None
        assert result.prompt_logprobs[1:] == pytest.approx([float(x) for x in at[: len(prompt) - 1]], abs=1e-5)
        assert result.logprobs == pytest.approx([float(x) for x in at[len(prompt) - 1:]], abs=1e-5)
        tops = result.prompt_top_logprobs[1:] + result.top_logprobs
        assert len(tops) == len(sequence) - 1
        for position, top in enumerate(tops):
            values, ids = ref[position].topk(4)
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


def test_max_new_tokens_zero_scores_the_prompt_alone(models):
    ours, _ = models("llama")
    engine = openseek.Engine(ours)
    try:
        scored = engine.submit(PROMPTS[0], 0, prompt_logprobs=True).result(timeout=60)
        single = engine.submit([7], 0, prompt_logprobs=True, top_logprobs=2).result(timeout=60)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            engine.submit(PROMPTS[0], 0)  # nothing to do without scoring the prompt
        with pytest.raises(ValueError, match="top_logprobs must be an integer >= 0"):
            engine.submit(PROMPTS[0], 1, logprobs=True, top_logprobs=-1)
    finally:
        engine.close()
    ref = reference_logprobs(ours, PROMPTS[0])
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert scored.prompt_logprobs[1:] == pytest.approx(
        [float(ref[i - 1, t]) for i, t in enumerate(PROMPTS[0]) if i > 0], abs=1e-5)
    assert single.prompt_logprobs == [None] and single.prompt_top_logprobs == [None]


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_prefix_cache_prefills_only_new_tokens_and_changes_nothing(models, kind):
    """The next turn (prompt + answer + more) and a prompt sharing a system prefix reuse the cached rows; greedy
    output equals the same engine without a prefix cache and decoding by full forwards."""
    ours, _ = models(kind)
    system = [5, 17, 33, 2, 60, 71, 8, 9, 10]
    first = system + [40, 3]

    def conversation(engine):
        one = engine.submit(first, 6, temperature=0, stop_token_ids=[]).result(timeout=60)
        second_prompt = first + one.token_ids + [11, 12]
        two = engine.submit(second_prompt, 6, temperature=0, stop_token_ids=[]).result(timeout=60)
        three = engine.submit(system + [90, 12, 45], 6, temperature=0, stop_token_ids=[]).result(timeout=60)
        return [one.token_ids, two.token_ids, three.token_ids], second_prompt

    cached, plain = openseek.Engine(ours), openseek.Engine(ours, prefix_cache_tokens=0)
    try:
        with_cache, second_prompt = conversation(cached)
        hits = cached.prefix_cache.hit_tokens
        without_cache, _ = conversation(plain)
        with torch.no_grad():  # an in-place update (what an optimizer step does) empties the cache
            ours.lm_head.weight.add_(0.0)
        again = cached.submit(first, 6, temperature=0, stop_token_ids=[]).result(timeout=60)
    finally:
        cached.close(), plain.close()
    assert plain.prefix_cache is None
    assert with_cache == without_cache
    assert with_cache[1] == greedy_by_full_forward(ours, second_prompt, 6)
    assert with_cache[2] == greedy_by_full_forward(ours, system + [90, 12, 45], 6)
    # turn 2 finds turn 1's prompt and all of its answer but the last token (never fed) cached; the third prompt
    # finds the system prefix
    assert hits == (len(first) + 6 - 1) + len(system)
    assert cached.prefix_cache.queried_tokens == len(first) * 2 + len(second_prompt) + len(system) + 3
    assert cached.prefix_cache.hit_tokens == hits and again.token_ids == with_cache[0]


def test_prefix_cache_is_bounded_and_drops_the_least_recently_used(models):
    from openseek.engine.prefix import PrefixCache

    ours, _ = models("qwen2")
    cache = make_cache(ours.cfg, 2, 16, torch.float32, torch.device("cpu"))
    for layer in cache.layers:
        for buffer in layer.buffers():
            buffer.normal_()
    store = PrefixCache(capacity=10)
    store.save([1, 2, 3, 4], cache, 0)
    store.save([5, 6, 7, 8], cache, 1)
    assert store.load([1, 2, 3, 9, 9], cache, 1) == 3  # touches [1, 2, 3, 4]: [5, 6, 7, 8] is now the oldest
    assert all(torch.equal(b[1, ..., :3, :] if b.dim() == 4 else b[1, :3], b[0, ..., :3, :] if b.dim() == 4
                           else b[0, :3]) for layer in cache.layers for b in layer.buffers())
    store.save([1, 2, 3, 4, 5], cache, 0)  # extends [1, 2, 3, 4], which goes
    assert store.tokens == 9 and len(store.entries) == 2
    store.save([9, 9, 9], cache, 0)  # 12 > 10 tokens: the least recently used entry leaves
    assert store.tokens == 8 and store.load([5, 6, 7, 8], cache, 1) == 0
    assert store.load([1, 2, 3, 4, 5, 6], cache, 1) == 5
    store.save(list(range(11)), cache, 0)  # longer than the whole cache: not kept
    assert store.tokens == 8


def test_compiled_models_of_one_class_keep_their_own_graphs(models, tmp_path):
    """The compiled forward skips dynamo's guards on the model (a tenth of an int4 step) and guards a tag of the
    model object instead: two models of one class, called in turn, each get their own graph and their own output
    (without the tag the second model's graph ran for the first and failed)."""
    from openseek.engine.compile import compiled_forwards

    models("qwen2")[1].save_pretrained(tmp_path)
    exact, quantized = openseek.load(tmp_path), openseek.load(tmp_path, dtype=torch.bfloat16, quantize="int8")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        for model in (exact, quantized, exact, quantized):
            got, want = compiled_forwards(model)[0](ids), model(ids)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    tags = [compiled_forwards(m)[0].args[1] for m in (exact, quantized, copy.deepcopy(exact))]
    assert len(set(tags)) == 3 and compiled_forwards(exact)[0].args[1] == tags[0]  # a copy is another model


@pytest.mark.parametrize("kind, dtype, quantize", [("qwen2", "float32", "none"), ("llama", "bfloat16", "int8"),
                                                   ("qwen2", "bfloat16", "int4"), ("deepseek_v3", "bfloat16", "none"),
                                                   ("deepseek_v3_wide", "bfloat16", "int8")])
def test_a_compiled_decode_step_gives_the_eager_step_s_tokens_and_logprobs(models, tmp_path, kind, dtype, quantize):
    """Engine(compile=True): the decode forward through torch.compile, our kernels held in its graph as operators
    (deepseek_v3_wide int8: MLA's absorbed attention, the routing and the whole experts kernel). Ragged rows, n = 2 (the batch size changes as rows leave), seeded sampling with log-probs."""
    models(kind)[1].save_pretrained(tmp_path)
    model = openseek.load(tmp_path, dtype=dtype, quantize=quantize)
    kwargs = dict(temperature=1.0, n=2, stop_token_ids=[3], logprobs=True, seed=11)
    eager = openseek.Engine(model).generate(PROMPTS, 10, **kwargs)
    # one thread count: dynamo guards on it, and the adaptive choice would compile each graph once per count
    compiled_engine = openseek.Engine(model, compile=True, threads=torch.get_num_threads())
    compiled = compiled_engine.generate(PROMPTS, 10, **kwargs)
    from openseek.kernels import ops

    on_our_kernels = ops.has("dense") and (quantize == "none" or ops.has("quantized"))
    if dtype == "float32" or on_our_kernels:
        assert [[s.token_ids for s in c] for c in compiled] == [[s.token_ids for s in e] for e in eager]
        for a, b in zip(compiled, eager):
            for x, y in zip(a, b):
                assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        return
    # PyTorch's bf16 kernels (no AVX-512, or OPENSEEK_KERNELS=0): inductor fuses the elementwise work and rounds
    # once where eager rounds each op (log-probs ~1e-4 apart), so a sampled token may flip where the sampler's draw
    # falls between the two; up to that point both steps agree to bf16's precision. The first token is prefill's,
    # the second the compiled decode step's.
    for a, b in zip(compiled, eager):
        for x, y in zip(a, b):
            same = next((i for i, (t, u) in enumerate(zip(x.token_ids, y.token_ids)) if t != u), len(y.token_ids))
            assert same >= min(2, len(y.token_ids)), (x.token_ids, y.token_ids)
            assert x.logprobs[:same] == pytest.approx(y.logprobs[:same], abs=2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.kernels("dense")
def test_the_latent_cache_kernel_stores_what_the_layers_would(models, tmp_path, dtype, level):
    """MLA decode on our kernel (the cache's `store_projected`: the new tokens' latent normalised and rope key
    rotated straight into the cache) gives the tokens and log-probs of the written-out path, bit for bit."""
    from openseek.engine.cache import _LatentLayer

    models("deepseek_v3_wide")[1].save_pretrained(tmp_path)
    model = openseek.load(tmp_path, dtype=dtype)
    kwargs = dict(temperature=1.0, n=2, stop_token_ids=[], logprobs=True, seed=3)
    fused = openseek.Engine(model).generate(PROMPTS, 8, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_LatentLayer, "store_projected", lambda self, *args: False)
        written_out = openseek.Engine(model).generate(PROMPTS, 8, **kwargs)
    assert [[(s.token_ids, s.logprobs) for s in c] for c in fused] == [
        [(s.token_ids, s.logprobs) for s in c] for c in written_out]


# ---- CUDA graphs: their bookkeeping on the CPU (the captures themselves run in tests/test_cuda.py) -----------------


class _Rerun:
    """A CPU stand-in for a captured CUDA graph: a replay runs the captured step again on the same static buffers
    and writes its logits where the graph's output lives, which is what replaying the graph's kernels does."""

    def __init__(self, step):
        self.step, self.out = step, step()

    def replay(self):
        self.out.copy_(self.step())

    def pool(self):
        return None


def test_cuda_graph_bookkeeping_gives_the_eager_engine_s_tokens(models, monkeypatch):
    """`Engine(cuda_graphs=True)` with each capture replaced by `_Rerun`: the static token and slot buffers each
    call copies into, attention over a bucket of slots (8 here, so steps cross buckets and attend over masked
    slots), one graph per (rows, bucket) made once and replayed after, `generate`'s cache kept between calls (its
    stale slots masked) and the serving batch's own graphs give the eager engine's tokens and log-probs."""
    from openseek.engine import compile as engine_compile

    captured = []

    def capture(step, pool):
        captured.append(step.args[2])
        graph = _Rerun(step)
        return graph, graph.out

    monkeypatch.setattr(engine_compile, "capture", capture)
    monkeypatch.setattr(engine_compile, "GRAPH_LENGTH_STEP", 8)
    monkeypatch.setattr("openseek.engine.engine.check_cuda_graphs", lambda model, speculative: None)
    ours, _ = models("qwen2")
    eager, graphed = openseek.Engine(ours), openseek.Engine(ours, cuda_graphs=True)
    # sampled, rows leaving at a stop token (the batch shrinks: graphs for fewer rows), then greedy
    for kwargs in (dict(temperature=1.0, n=2, stop_token_ids=[3], logprobs=True, seed=11),
                   dict(temperature=0, stop_token_ids=[])):
        want = eager.generate(PROMPTS, 20, **kwargs)
        got = graphed.generate(PROMPTS, 20, **kwargs)
        assert [[s.token_ids for s in c] for c in got] == [[s.token_ids for s in c] for c in want]
        # Attention over a bucket of slots sums over more (masked) positions than the eager step, so PyTorch's
        # kernels may block the reduction differently: the same log-probs to float32 rounding, not bit for bit.
        for got_choices, want_choices in zip(got, want):
            for g, w in zip(got_choices, want_choices):
                assert (g.logprobs is None) == (w.logprobs is None)
                if w.logprobs is not None:
                    torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                               rtol=0, atol=1e-5)
    kept = graphed._generate_graphs
    assert kept.cache.rows == 8 and kept.cache.max_len == 12 + 20
    assert sorted(kept.graphs) == sorted(set(kept.graphs)) and (4, 16) in kept.graphs and (4, 32) in kept.graphs
    assert all(length % 8 == 0 or length == kept.cache.max_len for _, length in kept.graphs)
    before = len(captured)
    again = graphed.generate(PROMPTS, 20, temperature=0, stop_token_ids=[])
    assert len(captured) == before and graphed._generate_graphs is kept  # replayed, not captured again
    assert [c[0].token_ids for c in again] == [c[0].token_ids for c in want]
    try:
        streamed = [r.result(timeout=60).token_ids
                    for r in [graphed.submit(p, 20, temperature=0, stop_token_ids=[]) for p in PROMPTS]]
    finally:
        graphed.close()
    assert streamed == [c[0].token_ids for c in want]


def test_cuda_graphs_are_refused_off_cuda_and_with_speculation(models):
    from openseek.engine.compile import check_cuda_graphs

    ours, _ = models("qwen2")
    with pytest.raises(ValueError, match=r"cuda_graphs=True \(--cuda-graphs\): the model is on cpu"):
        openseek.Engine(ours, cuda_graphs=True)
    on_cuda = type("OnCuda", (), {"device": torch.device("cuda", 0)})()
    with pytest.raises(ValueError, match="captures the plain decode step only; with speculative='mtp'"):
        check_cuda_graphs(on_cuda, "mtp")
