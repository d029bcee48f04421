"""The main job in miniature: the whole `openseek demo` pipeline on a tiny budget, then a rerun that reuses it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from openseek.cli import main
from openseek.demo import careless_solution
from openseek.tasks import get_task
from openseek.tokenizer import BOS, Tokenizer
from openseek.train.trainer import list_checkpoints

TINY = ["--size", "tiny", "--corpus-size", "4000", "--pretrain-steps", "400", "--batch-size", "48",
        "--grpo-steps", "12", "--grpo-rounds", "2", "--prompts-per-step", "8", "--group-size", "8",
        "--grpo-prompts", "200", "--heldout", "24", "--samples", "2", "--max-new-tokens", "40", "--grpo-lr", "3e-4",
        "--threads", "1"]


def test_careless_solution_forgets_every_carry():
    task = get_task("arithmetic:digits=3,ops=+")
    row = task.row(478, "+", 395)
    assert task.solution(row) == "<think> 8+5=13 , 7+9+1=17 , 4+3+1=8 </think><answer> 873 </answer>"
    assert careless_solution(row) == "<think> 8+5=13 , 7+9=16 , 4+3=7 </think><answer> 763 </answer>"
    assert careless_solution(task.row(12, "+", 5)) == "<think> 2+5=7 , 1+0=1 </think><answer> 17 </answer>"


def test_document_batches_are_whole_documents_with_shifted_labels():
    """Each row of a batch is one document from position 0, right-padded; its labels are the next tokens, IGNORE past
    the document's last; the batch is as wide as its longest document less one; a seed and a count fix the batch."""
    from openseek.data import IGNORE
    from openseek.demo import DocumentBatches
    from openseek.tokenizer import train_bpe

    task = get_task("arithmetic:digits=3,ops=+")
    docs = [task.row(a, "+", b)["prompt"] + task.solution(task.row(a, "+", b))
            for a, b in [(1, 2), (478, 395), (12, 5), (999, 999), (7, 30)]]
    tokenizer = train_bpe(docs, vocab_size=60, split_digits=True)
    batches = DocumentBatches(tokenizer, docs, batch_size=8, seed=3)
    encoded = [ids + [tokenizer.eos_token_id] for ids in tokenizer.encode_batch(docs)]
    for _ in range(3):
        batch = next(batches)
        ids, labels = batch["input_ids"], batch["labels"]
        rows = []
        for i in range(ids.shape[0]):  # which document is row i: the one whose tokens it starts with
            matches = [d for d in encoded if ids[i, : len(d) - 1].tolist() == d[:-1][: ids.shape[1]]]
            assert matches, ids[i]
            doc = matches[0]
            n = len(doc) - 1
            assert labels[i, :n].tolist() == doc[1:] and (labels[i, n:] == IGNORE).all()
            rows.append(doc)
        assert ids.shape[1] == max(len(d) for d in rows) - 1
    again = DocumentBatches(tokenizer, docs, batch_size=8, seed=3)
    again.load_state_dict({"count": 2})
    assert torch.equal(next(again)["labels"], labels)
    # a stream of 2 batches: the same first two, then it ends; only the documents they draw were tokenized
    whole, limited = DocumentBatches(tokenizer, docs, batch_size=2, seed=3), DocumentBatches(
        tokenizer, docs, batch_size=2, seed=3, batches=2)
    for _ in range(2):
        a, b = next(whole), next(limited)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(StopIteration):
        next(limited)
    drawn = {i for count in range(2) for i in limited._draw(count)}
    assert len(limited.ids) == len(drawn) < len(docs)


def test_demo_pipeline_end_to_end_then_reuses_finished_stages(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run), *TINY]) == 0
    report = json.loads((run / "report.json").read_text())
    for key in ("base_accuracy", "rl_accuracy", "heldout_size", "wall_seconds", "total_flops", "estimated_cost"):
        assert key in report
    assert report["heldout_size"] == 24 and 0 <= report["base_accuracy"] <= 1 and report["total_flops"] > 0
    assert report["mtp_greedy_identical"] is True and 0 <= report["mtp_acceptance"] <= 1  # speculation: same output
    for name in ("report.md", "demo.png", "pretrain/loss.png", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/tokenizer_config.json", "eval_base/summary.json"):
        assert (run / name).is_file(), name
    # chat and serve ask the final model exactly as it was trained: BOS + the question
    tokenizer = Tokenizer.from_dir(run / "model")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}]) == BOS + "What is 1 + 2?"
    rl = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl] == list(range(1, 13))
    # The reward reached the policy: groups with unequal rewards in every round, a finite non-zero gradient at every
    # step, and the final weights moved away from pretraining's. How far a tiny budget moves the rewards depends on
    # the CPU's kernel rounding (one CPU kind's format reward fell where another's rose), so the gain is the demo's
    # and benchmarks/demo_time.py's to show, not this test's.
    assert min(m["groups_without_signal"] for m in rl) < 8  # 8 prompts a step
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in rl)
    pretrained = load_file(list_checkpoints(run / "pretrain")[-1] / "model.safetensors")
    final = load_file(run / "model" / "model.safetensors")
    assert pretrained.keys() == final.keys()
    moved = [name for name in final if not torch.equal(final[name], pretrained[name])]
    assert len(moved) > len(final) // 2, moved
    capsys.readouterr()

    assert main(["demo", "--run-dir", str(run), *TINY]) == 0  # run again: every stage is reused
    out = capsys.readouterr().out
    assert out.count("already done") == 7
    assert json.loads((run / "report.json").read_text())["rl_accuracy"] == report["rl_accuracy"]
