"""Claim: llguidance computes a JSON-schema token mask in well under a millisecond per token at a 150k vocabulary,
with no compile step to speak of, and so costs a decode step nothing it would notice; xgrammar and outlines-core,
the other two well-kept libraries, are measured beside it on the same tokenizers and schema.

For each library and tokenizer: the time to compile the schema for the tokenizer (after its one-off tokenizer table,
also timed), then the mean time to compute the mask and advance by one token, stepping along the tokens of a JSON
text that matches the schema (the path a constrained row takes). Tokenizers: the serve tests' 362-token BPE, and a
150k-token byte-level BPE (`--tokenizer DIR` with a tokenizer.json, e.g. Qwen's; without it one is trained on the
Python sources on this machine, about five minutes, and kept in `--cache`). xgrammar and outlines-core are not
openseek dependencies: install them to compare (`pip install xgrammar outlines-core`); a missing one is skipped.

    .venv/bin/python benchmarks/grammar_masks.py [--tokenizer DIR] [--steps 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "address", "tags", "kind"],
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["person", "company", "robot"]},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 30}, "zip": {"type": "string",
                                                                                      "pattern": "^[0-9]{5}$"}}},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
    },
}
SAMPLE = {"name": "Ada Lovelace", "age": 36, "kind": "person", "address": {"city": "London", "zip": "10115"},
          "tags": ["math", "poet"]}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the vocabularies here are byte-level)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes]:
    decode, out = _byte_decoder(), []
    vocab = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {tokenizer.bos_token, tokenizer.eos_token}
    for i in range(tokenizer.vocab_size):
        text = vocab[i]
        out.append(text.encode() if text in special or any(c not in decode for c in text)
                   else bytes(decode[c] for c in text))
    return out


def run_llguidance(tokenizer, path: list[int]):
    from openseek.engine.constraint import GrammarCompiler

    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer)
    table = time.perf_counter() - start
    start = time.perf_counter()
    grammar = compiler.json_schema(SCHEMA)
    row = grammar.start()
    row.allowed()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for t in path:
        assert row.allowed()[t]
        row.advance(t)
    return table, compile_s, (time.perf_counter() - start) / len(path)


def run_xgrammar(tokenizer, path: list[int]):
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo([t for t in token_bytes(tokenizer)], xgrammar.VocabType.RAW,
                                  vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_token_id])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    table = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, tokenizer.vocab_size)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for t in path:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(t)
    return table, compile_s, (time.perf_counter() - start) / len(path)


def run_outlines_core(tokenizer, path: list[int]):
    import outlines_core

    start = time.perf_counter()
    mapping: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tokenizer)):
        if i != tokenizer.eos_token_id:
            mapping.setdefault(b, []).append(i)
    vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, mapping)
    table = time.perf_counter() - start
    start = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    guide = outlines_core.Guide(outlines_core.Index(regex, vocab))
    mask = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for t in path[:-1]:  # its final state takes no EOS token; the mask there is still computed
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        guide.advance(t)
    guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
    return table, compile_s, (time.perf_counter() - start) / len(path)


def big_tokenizer(directory: Path | None, cache: Path):
    from openseek.tokenizer import Tokenizer, train_bpe

    if directory is not None:
        return Tokenizer.from_dir(directory)
    if (cache / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cache)

    def utf8(path: Path) -> bool:
        try:
            path.read_bytes().decode("utf-8")
            return True
        except (UnicodeDecodeError, OSError):
            return False

    files = [Path(p) for p in glob.glob(f"{sys.prefix}/lib/python3*/**/*.py", recursive=True)
             + glob.glob("/usr/lib/python3*/**/*.py", recursive=True)]
    tokenizer = train_bpe([f for f in files if utf8(f)], 150_000)
    tokenizer.save(cache)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="a directory with a ~150k tokenizer.json")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-tokenizer-150k"))
    parser.add_argument("--steps", type=int, default=3, help="runs per cell (the median is reported)")
    args = parser.parse_args()
    from helpers_serve import build_tokenizer

    text = json.dumps(SAMPLE, ensure_ascii=False)
    runners = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines_core}
    print("| library | vocab | tokenizer table (s) | schema compile (ms) | mask + advance per token (µs) |")
    print("| --- | --- | --- | --- | --- |")
    for tokenizer in (build_tokenizer(), big_tokenizer(args.tokenizer, args.cache)):
        path = tokenizer.encode(text) + [tokenizer.eos_token_id]
        for name, run in runners.items():
            try:
                results = [run(tokenizer, path) for _ in range(args.steps)]
            except ImportError as e:
                print(f"| {name} | {tokenizer.vocab_size} | not installed ({e.name}) | | |")
                continue
            table, compile_s, per_token = (statistics.median(r[i] for r in results) for i in range(3))
            print(f"| {name} | {tokenizer.vocab_size} | {table:.2f} | {compile_s * 1e3:.1f} | {per_token * 1e6:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
