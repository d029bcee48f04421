"""Shared pieces of the training tests: a generated corpus, a tokenizer trained on it, tiny model configs."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

WORDS = [c + v + e for c in "bdkmt" for v in "aeiou" for e in "nrs"][::2][:30]  # 30 letter-only words

TINY_DEEPSEEK = dict(
    model_type="deepseek_v3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
    topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
    initializer_range=0.02, routed_scaling_factor=1.0,
)
TINY_QWEN = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)


def successor_documents(n_docs: int, seed: int = 0, length: tuple[int, int] = (8, 24)) -> list[str]:
    """Documents walking a fixed random cycle of 30 words: after the first word each next word is determined,
    so a model that learns the cycle predicts far better than the word frequencies (unigram entropy) allow."""
    rng = random.Random(seed)
    cycle = WORDS[:]
    random.Random(1234).shuffle(cycle)
    nxt = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    docs = []
    for _ in range(n_docs):
        word, out = rng.choice(WORDS), []
        for _ in range(rng.randint(*length)):
            out.append(word)
            word = nxt[word]
        docs.append(" ".join(out))
    return docs


def write_corpus(path: Path, docs: list[str], kind: str = "jsonl") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


def unigram_entropy(token_rows) -> float:
    """Entropy in nats of the token frequencies of the target tokens."""
    counts = Counter(t for row in token_rows for t in row)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def tiny_tokenizer(docs: list[str]):
    from openseek.tokenizer import train_bpe

    return train_bpe(docs, vocab_size=400)


def pretrain_setup(tmp: Path, model_cfg: dict | None = None, seq_len: int = 32, batch_size: int = 4,
                   n_docs: int = 300, seed: int = 0):
    """(model, batches, tokenizer, corpus path) for a tiny pretraining run on the successor corpus."""
    from openseek import data
    from openseek.train.pretrain import build_model

    docs = successor_documents(n_docs, seed=seed)
    corpus = write_corpus(tmp / "corpus.jsonl", docs)
    tokenizer = tiny_tokenizer(docs)
    model = build_model(dict(model_cfg or TINY_DEEPSEEK), tokenizer, seed)
    rows = data.PackedRows(data.Records([corpus]), tokenizer, seq_len)
    return model, data.Batches(rows, batch_size, data.collate_packed), tokenizer, corpus


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
