"""`openseek serve` as real clients use it: lm-evaluation-harness (`local-completions` with token-id prompts and
with the server's own tokenizer endpoints, `local-chat-completions`) scores a tiny random checkpoint exactly as its
own `hf` backend does; the `openai` client's log-probs equal transformers' log-softmax; prefix caching prefills only
new tokens and changes no output. Everything is built here: checkpoint (saved by transformers), tokenizer, tasks.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from conftest import build_hf_model
from helpers_serve import LiveServer

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
QUESTIONS = [("What colour is the sky", ["blue", "green", "red"], 0),
             ("Which animal barks", ["cat", "dog", "fish"], 1),
             ("How many legs has a spider", ["six", "eight", "four"], 1),
             ("What is frozen water", ["steam", "ice", "sand"], 1),
             ("Which planet is red", ["Mars", "Venus", "Earth"], 0),
             ("What do bees make", ["milk", "silk", "honey"], 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random qwen2 saved by transformers, with a byte-level BPE trained here and a plain chat template."""
    from openseek.tokenizer import train_bpe

    corpus = [f"Question: {q}? Answer: {' '.join(c)}" for q, c, _ in QUESTIONS] * 20
    tokenizer = train_bpe(corpus, vocab_size=300, chat_template=CHAT_TEMPLATE)
    model = build_hf_model("qwen2", vocab_size=tokenizer.vocab_size, max_position_embeddings=512,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path_factory.mktemp("eval") / "tiny"
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint):
    live = LiveServer(checkpoint[0])
    yield live
    live.stop()


def write_tasks(directory):
    """One multiple-choice (loglikelihood) and one generate_until task over local JSONL."""
    rows = [{"question": q, "choices": c, "answer": a, "target": c[a]} for q, c, a in QUESTIONS]
    data = directory / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    tasks = {
        "openseek_mc": {**common, "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}? Answer:",
                        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                        "metric_list": [{"metric": "acc"}]},
        "openseek_gen": {**common, "output_type": "generate_until", "doc_to_text": "Question: {{question}}?",
                         "doc_to_target": "{{target}}",
                         "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
                         "metric_list": [{"metric": "exact_match"}]},
    }
    for name, spec in tasks.items():
        (directory / f"{name}.yaml").write_text(json.dumps({"task": name, **spec}))  # JSON is YAML


def evaluate(model, model_args, tasks_dir, tasks, chat=False):
    """lm_eval.simple_evaluate, offline; returns {task: (metric value, [per-document responses])}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks_dir)),
                                      apply_chat_template=chat, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    metric = {"openseek_mc": "acc,none", "openseek_gen": "exact_match,none"}
    return {task: (results["results"][task][metric[task]],
                   [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])])
            for task in tasks}


def test_lm_eval_through_the_server_equals_its_hf_backend(checkpoint, server, tmp_path, monkeypatch):
    """Token-id prompts with lm-eval's own BOS (the server adds none) and the server's tokenizer (no BOS at all),
    each against the hf backend tokenizing the same way; then chat."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = checkpoint[0]
    write_tasks(tmp_path)
    tasks = ["openseek_mc", "openseek_gen"]
    hf = f"pretrained={directory},dtype=float32,device=cpu"
    url = f"base_url={server.url}/v1/completions,model=tiny,tokenized_requests=True"
    pairs = [
        (evaluate("hf", f"{hf},add_bos_token=True", tmp_path, tasks),
         evaluate("local-completions", f"{url},tokenizer={directory},tokenizer_backend=huggingface,add_bos_token=True",
                  tmp_path, tasks)),
        (evaluate("hf", f"{hf},add_bos_token=False", tmp_path, tasks),
         evaluate("local-completions", f"{url},tokenizer_backend=auto", tmp_path, tasks)),
    ]
    for theirs, ours in pairs:
        (hf_acc, hf_choices), (acc, choices) = theirs["openseek_mc"], ours["openseek_mc"]
        assert acc == hf_acc
        for mine, reference in zip(choices, hf_choices, strict=True):  # per document, per choice: (loglik, greedy)
            assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
            assert [g for _, g in mine] == [g for _, g in reference]
        assert ours["openseek_gen"] == theirs["openseek_gen"]  # identical greedy generations, same score
        assert any(text for [text] in theirs["openseek_gen"][1])  # the model does write something
    with_bos, without_bos = (theirs["openseek_mc"][1][0][0][0] for theirs, _ in pairs)
    assert abs(with_bos - without_bos) > 1e-3  # the BOS matters: a doubled or missing one would show

    hf_chat = evaluate("hf", hf, tmp_path, ["openseek_gen"], chat=True)
    chat = evaluate("local-chat-completions", f"base_url={server.url}/v1/chat/completions,model=tiny",
                    tmp_path, ["openseek_gen"], chat=True)
    assert chat == hf_chat


def transformers_logprobs(model, ids):
    """log_softmax of transformers' logits at every position of `ids`: [len(ids), V]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_openai_client_logprobs_equal_transformers(checkpoint, server):
    _, hf, tokenizer = checkpoint
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "What colour is the sky?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def check(entries, generated):
        ref = transformers_logprobs(hf, prompt + generated)
        for k, entry in enumerate(entries):
            row = ref[len(prompt) - 1 + k]
            assert entry.token == tokenizer.decode([generated[k]])
            assert entry.logprob == pytest.approx(float(row[generated[k]]), abs=1e-4)
            values, ids = row.topk(3)
            assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in ids.tolist()]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
            assert entry.bytes == list(entry.token.encode())

    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    with torch.no_grad():  # the same greedy tokens from transformers
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    generated = out[0, len(prompt):].tolist()
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens == 8
    check(whole.choices[0].logprobs.content, generated)

    streamed = [e for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]

    # completions: echo + logprobs over a token-id prompt (no BOS added), then 2 new tokens
    ids = tokenizer.encode("Question: Which animal barks? Answer: dog")
    response = client.completions.create(model="tiny", prompt=ids, max_tokens=2, temperature=0, logprobs=2,
                                         echo=True)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 2 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    assert response.choices[0].text.startswith(tokenizer.decode(ids))
    new = tokenizer.encode(response.choices[0].text[len(tokenizer.decode(ids)):])
    ref = transformers_logprobs(hf, ids + new)
    expected = [float(ref[i - 1, t]) for i, t in enumerate(ids + new) if i > 0]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for i, top in enumerate(logprobs.top_logprobs[1:], start=1):
        values, best = ref[i - 1].topk(2)
        wanted = {tokenizer.decode([t]): v for t, v in zip(best.tolist(), values.tolist())}
        wanted[logprobs.tokens[i]] = logprobs.token_logprobs[i]  # the chosen token is always there
        assert top.keys() == wanted.keys()
        assert list(top.values()) == pytest.approx(list(wanted.values()), abs=1e-4)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]

    # max_tokens 0 with echo scores the prompt alone
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == tokenizer.decode(ids) and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[: len(ids) - 1], abs=1e-4)


def test_several_prompts_in_one_request_each_get_their_choices(checkpoint, server):
    _, _, tokenizer = checkpoint
    texts = ["Which animal barks?", "What do bees make?"]
    ids = [tokenizer.encode(t) for t in texts]

    def ask(prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "n": 2}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()

    alone = [ask(t)["choices"][0]["text"] for t in texts]
    for prompt in (texts, ids):
        response = ask(prompt)
        assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in response["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
        assert response["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


def test_tokenizer_endpoints_round_trip(checkpoint, server):
    _, _, tokenizer = checkpoint
    text = "Question: Which planet is red?"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        special = http.post("/tokenize", json={"prompt": text}).json()  # vLLM's default adds them
        assert plain["tokens"] == tokenizer.encode(text) and plain["count"] == len(plain["tokens"])
        assert special["tokens"] == [tokenizer.bos_token_id, *plain["tokens"]]
        assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
        info = http.get("/tokenizer_info").json()
        assert (info["eos_token"], info["bos_token"], info["chat_template"]) == \
            (tokenizer.eos_token, tokenizer.bos_token, CHAT_TEMPLATE)
        bad = http.post("/detokenize", json={"tokens": [1, 10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def prefix_metrics(url):
    text = httpx.get(url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("openseek_")}
    return values["openseek_prefix_cache_queried_tokens_total"], values["openseek_prefix_cache_hit_tokens_total"]


def test_prefix_cache_second_turn_prefills_only_new_tokens_and_changes_no_output(checkpoint, server):
    directory, _, tokenizer = checkpoint
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    turn = [{"role": "user", "content": "What colour is the sky?"}]
    first = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, temperature=0)
    queried, hit = prefix_metrics(server.url)
    turn2 = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Which animal barks?"}]
    second = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=6, temperature=0)
    queried2, hit2 = prefix_metrics(server.url)
    ids1 = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)
    ids2 = tokenizer.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True)
    assert ids2[: len(ids1)] == ids1  # this template repeats the first turn's prompt verbatim
    assert queried2 - queried == len(ids2) == second.usage.prompt_tokens
    # at least the whole first prompt was cached; what the answer re-tokenizes to may add more
    common_with_answer = len(ids1) + next(
        (i for i, (a, b) in enumerate(zip(ids2[len(ids1):], tokenizer.encode(first.choices[0].message.content)))
         if a != b), 0)
    assert hit2 - hit >= len(ids1) and hit2 - hit >= common_with_answer - 1
    prefilled = len(ids2) - (hit2 - hit)
    assert prefilled <= len(ids2) - len(ids1)  # only the new tokens (the answer and the next question)

    # 16 concurrent greedy streams sharing a long system-like prefix: the same with the cache on and off
    plain = LiveServer(directory, "--no-prefix-cache")
    try:
        prompts = [f"Question: {q}? Answer: {c[k]} or" for q, c, _ in QUESTIONS for k in range(3)][:16]

        async def run(url):
            aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

            async def one(prompt):
                text = ""
                async for chunk in await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                                      temperature=0, stream=True):
                    text += chunk.choices[0].text if chunk.choices else ""
                return text

            return await asyncio.gather(*(one(p) for p in prompts))

        with_cache, without = asyncio.run(run(server.url)), asyncio.run(run(plain.url))
        assert "openseek_prefix_cache" not in httpx.get(plain.url + "/metrics").text
    finally:
        plain.stop()
    assert with_cache == without and any(with_cache)
    assert prefix_metrics(server.url)[1] > hit2  # the streams did share cached prefixes


def test_scoring_32_long_prompts_in_one_request_keeps_memory_bounded(tmp_path):
    """lm-evaluation-harness scores log-likelihoods with `echo` + `logprobs` over many prompts per request. The
    prefill keeps hidden states, not [T, V] float32 logits per prompt (32 × 1,000 × 32k would be 4.2 GB), and the
    head runs a chunk of positions at a time: the server grows by well under 1 GB, and each prompt's log-probs are
    those it gets alone."""
    import threading

    import openseek
    from openseek import Model, ModelConfig
    from helpers_serve import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=32768, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=1100, eos_token_id=[tokenizer.eos_token_id],
                      bos_token_id=tokenizer.bos_token_id)
    model = Model(cfg).eval()
    with torch.no_grad():  # the ids the tokenizer has win every position, so each top-1 can be written as text
        model.lm_head.weight[tokenizer.vocab_size:] = 0
        model.lm_head.weight[: tokenizer.vocab_size] *= 30
    directory = tmp_path / "wide-vocab"
    openseek.save(model, directory)
    tokenizer.save(directory)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tokenizer.vocab_size, (1000,), generator=generator).tolist() for _ in range(32)]
    body = dict(model="tiny", max_tokens=0, echo=True, logprobs=1)
    server = LiveServer(directory)
    try:
        httpx.post(server.url + "/v1/completions", json=body | {"prompt": prompts[:1]}, timeout=120)  # warm-up
        before, peak, done = server.rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], server.rss_bytes())
                done.wait(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            together = httpx.post(server.url + "/v1/completions", json=body | {"prompt": prompts}, timeout=300)
        finally:
            done.set()
            sampler.join()
        alone = [httpx.post(server.url + "/v1/completions", json=body | {"prompt": [p]}, timeout=120)
                 for p in prompts[:3]]
    finally:
        server.stop()
    assert together.status_code == 200, together.text
    assert peak[0] - before < 2**30, f"the server grew by {(peak[0] - before) / 2**20:.0f} MB"
    choices = sorted(together.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 32
    for response, choice in zip(alone, choices):
        single = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert single[0] is None and len(single) == 1000
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(single[1:], abs=1e-5)
