"""The main job in miniature: the whole `openseek demo` pipeline on a tiny budget, then a rerun that reuses it."""

import json

from openseek.cli import main
from openseek.demo import careless_solution
from openseek.tasks import get_task
from openseek.tokenizer import BOS, Tokenizer

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
    first, last = rl[:4], rl[-4:]
    # GRPO raises the reward (this tiny budget mostly teaches the format; the full demo moves accuracy).
    assert sum(m["reward"] for m in last) > sum(m["reward"] for m in first)
    capsys.readouterr()

    assert main(["demo", "--run-dir", str(run), *TINY]) == 0  # run again: every stage is reused
    out = capsys.readouterr().out
    assert out.count("already done") == 7
    assert json.loads((run / "report.json").read_text())["rl_accuracy"] == report["rl_accuracy"]
