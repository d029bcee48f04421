"""Claim: GRPO's per-token log-probs through the head in chunks use ≥ 4× less peak memory than full logits.

One loss step (forward and backward of the completion log-probs) at vocabulary 151936 over 16 × 512 tokens, on a
one-layer model (hidden 64) so that the head's logits dominate, each way in its own process; prints the peak
resident memory (ru_maxrss) of each and their ratio.

    .venv/bin/python benchmarks/logprob_memory.py [--rows 16] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(mode: str, rows: int, tokens: int) -> dict:
    import torch

    from openseek.config import ModelConfig
    from openseek.model import Model
    from openseek.train.logprobs import head_logprobs

    torch.manual_seed(0)
    model = Model(ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[0]))
    ids = torch.randint(0, 151936, (rows, tokens + 1))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hidden = model.hidden_states(ids[:, :-1])
    if mode == "full":
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    else:
        logp, _ = head_logprobs(model.lm_head, hidden, ids[:, 1:], entropy=True)
    logp.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak / 1024, "step_mib": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.tokens)))
        return
    results = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(args.rows), "--tokens",
                              str(args.tokens)], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:8s} peak RSS {results[mode]['peak_mib']:8.0f} MiB (the loss step added "
              f"{results[mode]['step_mib']:8.0f} MiB)", flush=True)
    ratio = results["full"]["step_mib"] / results["chunked"]["step_mib"]
    print(f"vocab 151936, {args.rows} x {args.tokens} tokens: chunked uses {ratio:.1f}x less memory for the step")


if __name__ == "__main__":
    main()
