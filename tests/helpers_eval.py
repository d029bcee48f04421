"""A tiny real model whose answers are known in advance, to test `openseek eval` end to end through the Engine.

The model is an ordinary openseek Model (one llama-style layer) turned into a next-token lookup table: the
embedding is the identity, attention and MLP write nothing back (o_proj = down_proj = 0), so the final hidden
state is the current token's one-hot vector and `lm_head[:, t]` scores the successors of token t. Whatever the
question, it replies `<think> easy</think><answer> 8</answer>` or, less often, the same with ` 9`: after
`<answer>` the two digits have logits ≈ 39 and ≈ 35 (P(9) ≈ 0.02 at temperature 1, far more at temperature 3),
so greedy decoding always answers 8.
"""

from __future__ import annotations

from pathlib import Path

import torch

QUESTIONS = {"What is 3 + 5?": "8", "What is 4 + 5?": "9", "What is 2 + 5?": "7"}
REPLY = "<think> easy</think><answer>"
SIZE = 320  # hidden size = padded vocabulary, so the embedding can be the identity
MARGIN = 2.0  # lm_head entry of a scripted successor; the logit is MARGIN * sqrt(SIZE) ≈ 36


def build_tokenizer():
    from openseek.tokenizer import train_bpe

    corpus = [" ".join(QUESTIONS) + f" {REPLY} 8</answer>{REPLY} 9</answer>"] * 50
    tokenizer = train_bpe(corpus, vocab_size=290)
    tokenizer.tokenizer.add_tokens(["<answer>", "</answer>"])  # single ids that survive skip_special_tokens
    return tokenizer


def _table(tokenizer, nine_weight: float) -> dict[int, dict[int, float]]:
    """token id -> {successor id: lm_head weight}."""
    chain = tokenizer.encode(REPLY)
    eight, nine, close = tokenizer.encode(" 8"), tokenizer.encode(" 9"), tokenizer.encode("</answer>")
    assert len(eight) == len(nine) == len(close) == 1 and len(set(chain)) == len(chain), (chain, eight, nine, close)
    table = {a: {b: MARGIN} for a, b in zip(chain, chain[1:])}
    table[chain[-1]] = {eight[0]: MARGIN, nine[0]: MARGIN * nine_weight}
    table[eight[0]] = table[nine[0]] = {close[0]: MARGIN}
    table[close[0]] = {tokenizer.eos_token_id: MARGIN}
    for question in QUESTIONS:
        last = tokenizer.encode(question)[-1]
        assert last not in table or table[last] == {chain[0]: MARGIN}, f"question token {last} is in the reply"
        table[last] = {chain[0]: MARGIN}
    return table


def build_model(tokenizer, nine_weight: float = 0.9):
    from openseek import Model, ModelConfig

    assert tokenizer.vocab_size <= SIZE
    cfg = ModelConfig(model_type="llama", vocab_size=SIZE, hidden_size=SIZE, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      eos_token_id=[tokenizer.eos_token_id], bos_token_id=tokenizer.bos_token_id)
    model = Model(cfg).eval()
    head = torch.zeros(SIZE, SIZE)
    for token, successors in _table(tokenizer, nine_weight).items():
        for successor, weight in successors.items():
            head[successor, token] = weight
    head[tokenizer.eos_token_id, head.sum(0) == 0] = MARGIN  # anything unscripted ends the reply
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.eye(SIZE))
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(head)
    return model


def save_model_dir(directory: Path) -> Path:
    import openseek

    tokenizer = build_tokenizer()
    openseek.save(build_model(tokenizer), directory)
    tokenizer.save(directory)
    return Path(directory)
