"""MTP speculative decoding in the Engine: greedy output identical to plain decoding (random DeepSeek-V3 checkpoints
with MTP, with and without YaRN and q LoRA, and a trained model), sampling exact in distribution (chi-square over
20,000 seeded draws, which a wrong acceptance rule fails), streaming, log-probs, statistics and bad input."""

from __future__ import annotations

import argparse

import pytest
import torch

import openseek
from openseek.engine import sampling
from openseek.engine.sampling import Sampler, SamplingParams
from openseek.serve.metrics import Metrics

from conftest import build_hf_model
from helpers_train import WORDS, pretrain_setup

PROMPTS = [[5, 17, 33, 2, 60, 71, 8], [40, 3], [11], [90, 12, 45, 45, 7, 1, 2, 3, 4, 5, 6, 70]]  # ragged, one of 1


def with_random_mtp(model: openseek.Model, seed: int = 0) -> openseek.Model:
    """`model` plus one random MTP layer (weights as large as conftest's, so its drafts are not all ~uniform)."""
    torch.manual_seed(seed)
    out = openseek.Model(model.cfg.replace(num_nextn_predict_layers=1))
    out.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for name, tensor in out.mtp.state_dict(keep_vars=True).items():
            if tensor.dim() >= 2:
                tensor.normal_(0, 0.08)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.5)
    return out.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> a random DeepSeek-V3 checkpoint with an MTP layer, saved and loaded back (built once per module)."""
    built = {}

    def get(kind):
        if kind not in built:
            base_dir = tmp_path_factory.mktemp(kind)
            build_hf_model(kind).save_pretrained(base_dir)
            directory = tmp_path_factory.mktemp(kind + "_mtp")
            openseek.save(with_random_mtp(openseek.load(base_dir)), directory)
            built[kind] = openseek.load(directory)
            assert built[kind].cfg.num_nextn_predict_layers == 1
        return built[kind]

    return get


def token_ids(outs):
    return [[s.token_ids for s in samples] for samples in outs]


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v3_yarn", "deepseek_v3_lite"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_speculation_is_identical_on_random_mtp_checkpoints(models, kind, k):
    """Ragged prompts (one of a single token), n = 2, log-probs: tokens identical, log-probs the main model's."""
    model = models(kind)
    plain = openseek.Engine(model).generate(PROMPTS, 12, temperature=0, n=2, stop_token_ids=[], logprobs=True)
    engine = openseek.Engine(model, speculative="mtp", num_speculative_tokens=k)
    fast = engine.generate(PROMPTS, 12, temperature=0, n=2, stop_token_ids=[], logprobs=True)
    assert token_ids(fast) == token_ids(plain)
    for a, b in zip(fast, plain):
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4) and x.finish_reason == y.finish_reason
    s = engine.stats
    assert s.steps > 0 and s.drafted == k * s.steps and 0 <= s.accepted <= s.drafted
    assert s.mean_accepted_length == pytest.approx(1 + s.accepted / s.steps)


def test_compiled_speculation_gives_the_eager_engine_s_greedy_tokens(models):
    """Engine(compile=True) compiles the verify forward and the MTP module too (the routed experts stay eager)."""
    model = models("deepseek_v3")
    plain = openseek.Engine(model).generate(PROMPTS, 12, temperature=0, n=2, stop_token_ids=[], logprobs=True)
    # one thread count: dynamo guards on it, and the adaptive choice would compile each graph once per count
    engine = openseek.Engine(model, speculative="mtp", num_speculative_tokens=2, compile=True,
                             threads=torch.get_num_threads())
    fast = engine.generate(PROMPTS, 12, temperature=0, n=2, stop_token_ids=[], logprobs=True)
    assert token_ids(fast) == token_ids(plain)
    for a, b in zip(fast, plain):
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
    eager = openseek.Engine(model, speculative="mtp", num_speculative_tokens=2)
    eager.generate(PROMPTS, 12, temperature=0, n=2, stop_token_ids=[], logprobs=True)
    assert engine.stats == eager.stats  # the same drafts accepted


def test_rows_stopping_at_different_steps_match_plain_decoding(models):
    model = models("deepseek_v3")
    prompts = [[i + 1, 2 * i + 3, 7] for i in range(8)]
    free = token_ids(openseek.Engine(model).generate(prompts, 30, temperature=0, stop_token_ids=[]))
    counts = {}
    for (row,) in free:
        for t in set(row[:15]):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (counts[t] < len(prompts), counts[t]))  # in many rows but not all
    plain = openseek.Engine(model).generate(prompts, 30, temperature=0, stop_token_ids=[stop])
    fast = openseek.Engine(model, speculative="mtp", num_speculative_tokens=2).generate(
        prompts, 30, temperature=0, stop_token_ids=[stop])
    assert token_ids(fast) == token_ids(plain)
    assert [o.finish_reason for (o,) in fast] == [o.finish_reason for (o,) in plain]
    assert sum(o.finish_reason == "stop" for (o,) in fast) >= 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DeepSeek-V3 pretrained with an MTP loss on the successor corpus (each word determines the next), and
    prompts of its text."""
    from openseek.train.pretrain import NextTokenLoss
    from openseek.train.config import TrainConfig
    from openseek.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("trained")
    model, batches, tokenizer, _ = pretrain_setup(tmp, seq_len=64, batch_size=4)
    cfg = TrainConfig(run_dir=str(tmp / "run"), steps=60, lr=1e-2, warmup_steps=4, progress=False, threads="1",
                      precision="float32", balance_gamma=1e-3)
    Trainer(model, cfg, tokenizer).fit(batches, NextTokenLoss(mtp_weight=0.3, mtp_depths=1))
    prompts = [tokenizer.encode(" ".join(WORDS[i : i + 1 + i % 3])) for i in range(8)]  # ragged
    return model.eval(), prompts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_speculation_is_identical_on_a_trained_model_and_mostly_accepted(trained, k):
    model, prompts = trained
    plain = openseek.Engine(model).generate(prompts, 24, temperature=0, stop_token_ids=[])
    engine = openseek.Engine(model, speculative="mtp", num_speculative_tokens=k)
    fast = engine.generate(prompts, 24, temperature=0, stop_token_ids=[])
    assert token_ids(fast) == token_ids(plain)
    print(f"k={k}: acceptance {engine.stats.acceptance_rate:.2f}, "
          f"mean accepted length {engine.stats.mean_accepted_length:.2f}")
    assert engine.stats.acceptance_rate > 0.5  # the MTP module learned the corpus too: rows accept ragged counts


def test_streaming_with_speculation_matches_generate_with_logprobs_and_prefix_cache(models):
    """The serving thread runs the same speculative step: requests joining a running batch, per-token log-probs
    and top log-probs, and a second turn that continues a cached prefix."""
    model = models("deepseek_v3")
    expected = token_ids(openseek.Engine(model).generate(PROMPTS, 10, temperature=0, stop_token_ids=[]))
    engine = openseek.Engine(model, max_batch_size=3, speculative="mtp", num_speculative_tokens=2)
    try:
        handles = [engine.submit(p, 10, temperature=0, stop_token_ids=[], logprobs=True, top_logprobs=3)
                   for p in PROMPTS]  # 4 requests, 3 rows: the last joins when a row frees up
        results = [h.result(timeout=60) for h in handles]
        second_prompt = PROMPTS[0] + results[0].token_ids + [11, 12]
        second = engine.submit(second_prompt, 8, temperature=0, stop_token_ids=[]).result(timeout=60)
    finally:
        engine.close()
    assert [[r.token_ids] for r in results] == expected
    assert engine.prefix_cache.hit_tokens > 0
    assert second.token_ids == openseek.Engine(model).generate([second_prompt], 8, temperature=0,
                                                               stop_token_ids=[])[0][0].token_ids
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + result.token_ids]))[0, len(prompt) - 1 : -1]
        ref = logits.log_softmax(-1)
        assert result.logprobs == pytest.approx(ref.max(-1).values.tolist(), abs=1e-4)
        assert [[i for i, _ in top] for top in result.top_logprobs] == ref.topk(3).indices.tolist()
    assert engine.stats.steps > 0


# ---- sampling is exact in distribution ---------------------------------------------------------------------------


TINY_VOCAB = 8


@pytest.fixture(scope="module")
def tiny_vocab_model():
    """A random DeepSeek-V3 with MTP over 8 tokens, its weights large enough that p and the drafts' q differ."""
    torch.manual_seed(1)
    cfg = openseek.ModelConfig(
        model_type="deepseek_v3", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=16, n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=64, eos_token_id=[0],
    )
    model = openseek.Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def exact_first_two(model, prompt, params: SamplingParams) -> torch.Tensor:
    """P(first token a, second token b) [V, V] under the model's sampling distribution with `params`."""
    sampler = Sampler([params], torch.device("cpu"))
    with torch.no_grad():
        first = sampler.distribution(model(torch.tensor([prompt]))[:, -1].float())[1][0].double()
        seconds = torch.tensor([[*prompt, a] for a in range(TINY_VOCAB)])
        second = Sampler([params] * TINY_VOCAB, torch.device("cpu")).distribution(
            model(seconds)[:, -1].float())[1].double()
    return first[:, None] * second


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness of fit; cells expecting fewer than 5 draws are pooled. The p-value is the chi-square
    survival function, Q(df/2, x/2)."""
    counts, expected = counts.flatten().double(), expected.flatten()
    small = expected < 5
    if small.any():
        counts = torch.cat((counts[~small], counts[small].sum()[None]))
        expected = torch.cat((expected[~small], expected[small].sum()[None]))
    assert (counts[expected == 0] == 0).all(), "a draw outside the distribution's support"
    keep = expected > 0
    statistic = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    df = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


def first_two_counts(model, prompt, params: SamplingParams, draws: int, seed: int, **engine_args) -> torch.Tensor:
    engine = openseek.Engine(model, max_batch_size=draws, **engine_args)
    (samples,) = engine.generate([prompt], 2, temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k, n=draws, seed=seed, stop_token_ids=[])
    pairs = torch.tensor([s.token_ids for s in samples])
    return torch.bincount(pairs[:, 0] * TINY_VOCAB + pairs[:, 1], minlength=TINY_VOCAB**2).view(TINY_VOCAB, -1)


DRAWS = 20_000
PROMPT = [3, 1, 4, 1, 5]


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, top_p=0.9, top_k=5)],
                         ids=["T=1", "T=0.8,top_p=0.9,top_k=5"])
def test_sampling_with_speculation_is_exact_in_distribution(tiny_vocab_model, params):
    expected = exact_first_two(tiny_vocab_model, PROMPT, params) * DRAWS
    plain = first_two_counts(tiny_vocab_model, PROMPT, params, DRAWS, seed=0)
    assert chi_square_p_value(plain, expected) > 1e-3
    for k in (1, 2):
        engine_args = dict(speculative="mtp", num_speculative_tokens=k)
        spec = first_two_counts(tiny_vocab_model, PROMPT, params, DRAWS, seed=1, **engine_args)
        p_value = chi_square_p_value(spec, expected)
        print(f"{params}, k={k}: chi-square p = {p_value:.3f}")
        assert p_value > 1e-3


def test_a_wrong_acceptance_rule_fails_the_same_test(tiny_vocab_model, monkeypatch):
    """Resampling a rejected draft from p instead of norm(max(0, p - q)) — a classic bug — favours the draft's
    tokens; the same chi-square test must catch it (so the test above can fail)."""
    params = SamplingParams(1.0)
    expected = exact_first_two(tiny_vocab_model, PROMPT, params) * DRAWS
    engine = openseek.Engine(tiny_vocab_model, speculative="mtp")
    engine.generate([PROMPT], 2, n=200, seed=0, stop_token_ids=[])
    assert 0.05 < engine.stats.acceptance_rate < 0.95  # drafts are neither always right nor always wrong
    monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    wrong = first_two_counts(tiny_vocab_model, PROMPT, params, DRAWS, seed=1, speculative="mtp")
    assert chi_square_p_value(wrong, expected) < 1e-6


# ---- statistics, flags, bad input --------------------------------------------------------------------------------


def test_stats_appear_on_metrics_and_serve_takes_the_flags(models):
    from openseek.serve import app

    engine = openseek.Engine(models("deepseek_v3"), speculative="mtp", num_speculative_tokens=2)
    engine.generate(PROMPTS, 6, temperature=0, stop_token_ids=[])
    text = Metrics(8, lambda: 0, lambda: 0, None, engine.stats).render().decode()
    assert f"openseek_spec_decode_draft_tokens_total {float(engine.stats.drafted)}" in text
    assert f"openseek_spec_decode_accepted_tokens_total {float(engine.stats.accepted)}" in text
    assert "openseek_spec_decode_acceptance_rate" in text and "openseek_spec_decode_mean_accepted_length" in text
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--speculative", "mtp", "--num-speculative-tokens", "3", "--compile"])
    assert (args.speculative, args.num_speculative_tokens, args.compile) == ("mtp", 3, True)
    assert engine.kv_bytes_per_token == openseek.Engine(engine.model).kv_bytes_per_token * 4 // 3  # + MTP layer


def test_bad_speculation_arguments_raise_value_error_naming_the_reason(models):
    without_mtp = openseek.Model(models("deepseek_v3").cfg.replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="speculative='mtp' needs a model with MTP modules"):
        openseek.Engine(without_mtp, speculative="mtp")
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
            openseek.Engine(models("deepseek_v3"), speculative="mtp", num_speculative_tokens=k)
    with pytest.raises(ValueError, match="the one kind is 'mtp'"):
        openseek.Engine(models("deepseek_v3"), speculative="eagle")
