"""`openseek demo`: R1-Zero in miniature on a laptop CPU.

1. data: worked solutions of 3-digit additions written as `<think> column steps </think><answer> x </answer>`,
   and a digit-splitting BPE tokenizer trained on them. The corpus is deliberately of mixed quality, as web text
   is: most solutions forget the carries (`7+9=16` where `7+9+1=17` was due) and only `--correct-fraction` are
   right. Held-out problems come from the task's test split, never seen in pretraining or RL.
2. pretrain a tiny DeepSeek-V3-style model (MLA, MoE with a shared expert and auxiliary-loss-free balancing, MTP).
   It learns the method and both habits; greedy decoding follows the majority habit, so it is mostly wrong.
3. measure it on the held-out problems: greedy accuracy, and pass@k of samples (the correct habit is in there).
4. GRPO with R1's rule-based rewards (accuracy + format) reinforces whatever reaches the right answer.
5. measure again, with held-out accuracy tracked between RL rounds.
6. measure the final model's batch-1 greedy decode speed with and without MTP speculative decoding (its MTP
   module, trained with the model, drafting for it), its acceptance rate, and that the outputs are identical.
7. write report.md/report.json with plots, and the final model (HF format + tokenizer) in `<run>/model`.

Every stage leaves its result in the run directory; run the demo again (after Ctrl-C, say) and finished stages
are reused, an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

import openseek
from openseek import report as reporting
from openseek.evaluate import evaluate
from openseek.rewards import format_reward
from openseek.device import resolve_device
from openseek.demo_tasks import DEMO_TASKS, careless_solution  # noqa: F401 (careless_solution: the demo's API)
from openseek.demo_tasks import growth, plot_reasoning, reasoning_curve, window_mean
from openseek.flags import add_threads_argument
from openseek.tokenizer import BOS, Tokenizer, train_bpe
from openseek.train.config import TrainConfig
from openseek.train.trainer import Trainer, list_checkpoints

SIZES = {  # DeepSeek-V3 in miniature: MLA, 8 routed experts (2 groups) + 1 shared, first layer dense, one MTP depth
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, moe_intermediate_size=32),
    # the small model's student in benchmarks/r1_findings.py: half its width, half its layers
    "half": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, moe_intermediate_size=24),
    "small": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, moe_intermediate_size=48),
    # as deep relative to its one MTP layer as a real model (DeepSeek-V3: 61 layers + 1): what speculation's
    # benchmark measures beside the demo's own model, where the MTP layer is a fifth of the layers
    "deep": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=16, moe_intermediate_size=48),
}

EVAL_BATCH = 128  # completions per decode step in the evaluations
SPECULATION_PROMPTS = 8  # held-out prompts decoded at batch 1, with and without MTP, three times each


def model_config(size: str, tokenizer: Tokenizer) -> dict:
    return dict(
        SIZES[size], model_type="deepseek_v3", vocab_size=tokenizer.vocab_size, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.0, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, rope_theta=10000.0,
    )


# The demo model is asked exactly as it was trained: BOS + the last question, no role markers (chat and serve use
# this). A conversation that ends with the assistant's reply to it renders as a corpus document, the reply and EOS
# after the question: what `openseek sft` trains a student on (benchmarks/r1_findings.py).
PLAIN_CHAT_TEMPLATE = (
    "{%- set turn = namespace(question='', reply=none) -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{%- set turn.question = m.content -%}{%- set turn.reply = none -%}"
    "{%- elif m.role == 'assistant' -%}{%- set turn.reply = m.content -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ turn.question }}{% if turn.reply is not none %}{{ turn.reply }}{{ eos_token }}{% endif %}"
)


class DocumentBatches:
    """Pretraining batches of whole documents, each starting at position 0 and right-padded (padding carries no
    loss): every problem is seen exactly as it is asked at evaluation time. Resumable by batch count.

    The corpus is padded into one table of inputs and one of labels up front, so that a batch is two row gathers
    instead of a row-by-row build. Given `batches`, the stream ends after that many and only the documents they draw
    are tokenized (the demo's batches draw about half of its corpus; benchmarks/RESULTS.md, "Round 11 — Where the
    demo's time went")."""

    def __init__(self, tokenizer: Tokenizer, docs: list[str], batch_size: int, seed: int, batches: int | None = None):
        from openseek.data import IGNORE

        self.batch_size, self.seed, self.count, self.corpus_size, self.batches = batch_size, seed, 0, len(docs), batches
        drawn = (sorted({i for count in range(batches) for i in self._draw(count)}) if batches is not None
                 else range(len(docs)))
        self.row_of_document = torch.full((len(docs),), -1)  # the table row holding each drawn document
        self.row_of_document[list(drawn)] = torch.arange(len(drawn))
        rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer.encode_batch([docs[i] for i in drawn])]
        self.lengths = torch.tensor([len(row) for row in rows])
        width, pad = int(self.lengths.max()), tokenizer.pad_token_id or 0
        self.ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        # the label at position j is token j + 1 of the same document, while there is one
        self.labels = torch.full_like(self.ids, IGNORE)
        self.labels[:, :-1] = self.ids[:, 1:]
        self.labels[torch.arange(self.ids.shape[1]) >= self.lengths[:, None] - 1] = IGNORE

    def _draw(self, count: int) -> list[int]:
        """The documents of batch `count`: a function of the seed and the count alone, so a resumed run draws the
        same batches."""
        rng = random.Random(f"{self.seed}:{count}")
        return [rng.randrange(self.corpus_size) for _ in range(self.batch_size)]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batches is not None and self.count >= self.batches:
            raise StopIteration
        picks = self.row_of_document[self._draw(self.count)]
        self.count += 1
        width = int(self.lengths[picks].max()) - 1  # the last token of the longest document is only a label
        return {"input_ids": self.ids[picks, :width], "labels": self.labels[picks, :width]}

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.demo_task = DEMO_TASKS[args.task]
        # the flags left unset take the task's defaults
        self.args = args = argparse.Namespace(**{**vars(args), **{
            k: v for k, v in self.demo_task.defaults.items() if getattr(args, k, None) is None}})
        self.run = Path(args.run_dir)
        self.tasks = self.demo_task.tasks()
        self.task = self.tasks["rl"]
        self.device = str(resolve_device(args.device))
        self.timings_path = self.run / "stages.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.trainer_threads = "auto" if args.threads is None else str(args.threads)  # TrainConfig's spelling

    def problems(self, n: int, seed: int, split: str, role: str) -> list[dict]:
        """n distinct problems of a stage (`role`: corpus, rl or heldout) whose two numbers both have at least the
        demo task's `min_digits` digits (3: digits then sit at fixed positions, which a model this small needs to
        read them reliably); held out, only those the task's `heldout_keep` takes."""
        keep = self.demo_task.heldout_keep if role == "heldout" else None
        draw = int(n * 1.4) + 50 if keep is None else 4 * n + 50
        rows = [r for r in self.tasks[role].generate(draw, seed=seed, split=split)
                if min(r["a"], r["b"]) >= 10 ** (self.demo_task.min_digits - 1) and (keep is None or keep(r))]
        if len(rows) < n:
            raise ValueError(f"only {len(rows)} {role} problems ({split} split) drawn, {n} asked for")
        return rows[:n]

    def stage(self, name: str, done: bool, work):
        """Run a stage unless its result is already in the run directory; record its wall time."""
        if done:
            print(f"[{name}] already done in {self.run} — reused")
            return
        print(f"[{name}]")
        started = time.perf_counter()
        work()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
        self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n")

    # ---- 1. data and tokenizer ----

    def make_data(self) -> None:
        a = self.args
        rows = self.problems(a.corpus_size, seed=a.seed, split="train", role="corpus")
        rng = random.Random(a.seed)
        docs = [{"text": BOS + row["prompt"] + self.demo_task.write(row, rng, a.correct_fraction)} for row in rows]
        data = self.run / "data"
        data.mkdir(parents=True, exist_ok=True)
        with open(data / "corpus.jsonl.tmp", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        tokenizer = train_bpe([d["text"] for d in docs[:5000]], vocab_size=320, split_digits=True,
                              chat_template=PLAIN_CHAT_TEMPLATE)
        tokenizer.save(self.run / "tokenizer")
        (data / "corpus.jsonl.tmp").rename(data / "corpus.jsonl")

    # ---- 2. pretraining ----

    def pretrain(self) -> None:
        from openseek.train.pretrain import NextTokenLoss, build_model

        a = self.args
        tokenizer = Tokenizer.from_dir(self.run / "tokenizer")
        model = build_model(model_config(a.size, tokenizer), tokenizer, seed=a.seed)
        docs = [json.loads(line)["text"] for line in open(self.run / "data" / "corpus.jsonl")]
        cfg = TrainConfig(
            run_dir=str(self.run / "pretrain"), steps=a.pretrain_steps, lr=a.pretrain_lr, warmup_steps=30,
            weight_decay=0.0, balance_gamma=1e-3, checkpoint_every=100, keep_checkpoints=1, resume=True, seed=a.seed,
            device=self.device, log_every=5, threads=self.trainer_threads, precision=a.precision,
        )
        batches = DocumentBatches(tokenizer, docs, a.batch_size, seed=a.seed, batches=a.pretrain_steps)
        objective = NextTokenLoss(mtp_weight=0.3, mtp_depths=model.cfg.num_nextn_predict_layers, mtp_rows=a.mtp_rows)
        Trainer(model, cfg, tokenizer).fit(batches, objective)

    # ---- 3 and 5. evaluation ----

    def heldout(self) -> list[dict]:
        return self.problems(self.args.heldout, seed=self.args.seed, split="test", role="heldout")

    def evaluate(self, model_dir: Path, out: Path, n: int) -> dict:
        model = openseek.load(model_dir, device=self.device)
        tokenizer = Tokenizer.from_dir(model_dir)
        # 128 rows a step: this model's decode step costs 1.4x batch 64's for twice the rows
        engine = openseek.Engine(model, max_batch_size=EVAL_BATCH, threads=self.args.threads)
        result = evaluate(engine, tokenizer, self.heldout(), task=self.task, n=n, ks=[1, n] if n > 1 else [1],
                          temperature=1.0 if n > 1 else 0.0, max_new_tokens=self.args.max_new_tokens,
                          template="plain", seed=self.args.seed, greedy=n > 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
        with open(out / "results.jsonl", "w") as f:
            f.writelines(json.dumps({k: r[k] for k in ("prompt", "answer", "completions", "correct")}) + "\n"
                         for r in result.rows)
        engine.close()
        print(result.markdown())
        return result.summary

    # ---- 4. GRPO, in rounds with a held-out check between them ----

    def grpo(self) -> None:
        a = self.args
        grpo_dir = self.run / "grpo"
        curve_path = self.run / "rl_curve.json"
        curve = json.loads(curve_path.read_text()) if curve_path.is_file() else []
        rounds = max(1, a.grpo_rounds)
        per_round = -(-a.grpo_steps // rounds)
        for r in range(1, rounds + 1):
            target = min(a.grpo_steps, r * per_round)
            if any(point["step"] >= target for point in curve):
                continue
            done = list_checkpoints(grpo_dir)
            self.reinforce(done[-1] if done else list_checkpoints(self.run / "pretrain")[-1], grpo_dir, target,
                           checkpoint_every=per_round)
            checkpoint = list_checkpoints(grpo_dir)[-1]
            summary = self.evaluate(checkpoint, self.run / "eval_rl_rounds" / checkpoint.name, n=1)
            curve.append({"step": target, "greedy_accuracy": summary["metrics"]["greedy_accuracy"]})
            curve_path.write_text(json.dumps(curve, indent=2) + "\n")

    def reinforce(self, start: Path, run_dir: Path, steps: int, checkpoint_every: int,
                  max_seconds: float = 0.0) -> dict:
        """GRPO from checkpoint `start` up to `steps` (resuming `run_dir`), or until `max_seconds` of training wall
        time, with the demo's settings: R1's rewards (accuracy + 0.1 × format), DAPO's token-mean loss (no length
        normalisation per completion, so no bias towards long wrong answers), clip-higher and dynamic sampling. A
        task that charts its reasoning logs every completion (`completions.jsonl`)."""
        from openseek.train.grpo import GRPOConfig, train

        a = self.args
        model = openseek.load(start, dtype=torch.float32)
        tokenizer = Tokenizer.from_dir(start)
        grpo_cfg = GRPOConfig(group_size=a.group_size, prompts_per_step=a.prompts_per_step,
                              max_new_tokens=a.max_new_tokens, temperature=1.0, beta=0.0, loss_type="dapo",
                              epsilon_high=0.28, dynamic_sampling=True, template="plain",
                              log_completions=self.demo_task.reasoning)
        train_cfg = TrainConfig(run_dir=str(run_dir), steps=steps, max_seconds=max_seconds, lr=a.grpo_lr,
                                schedule="constant", weight_decay=0.0, checkpoint_every=checkpoint_every,
                                keep_checkpoints=1, resume=True, seed=a.seed, device=self.device,
                                threads=self.trainer_threads, precision=a.precision)
        rows = self.problems(a.grpo_prompts, seed=a.seed + 1, split="train", role="rl")
        return train(model, tokenizer, rows, [self.task.reward, format_reward], grpo_cfg, train_cfg,
                     weights=[1.0, 0.1], accuracy_fn=self.task.reward)

    def grpo_done(self) -> bool:
        curve = self.run / "rl_curve.json"
        return curve.is_file() and max(p["step"] for p in json.loads(curve.read_text())) >= self.args.grpo_steps

    def final_model(self) -> None:
        checkpoint = list_checkpoints(self.run / "grpo")[-1]
        tmp = self.run / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns("optimizer.pt", "rng.pt", "trainer_state.json"))
        tmp.rename(self.run / "model")

    # ---- 6. speculative decoding ----

    def measure_speculation(self) -> None:
        model = openseek.load(self.run / "model", device=self.device)
        tokenizer = Tokenizer.from_dir(self.run / "model")
        prompts = [tokenizer.encode(BOS + row["prompt"]) for row in self.heldout()[:SPECULATION_PROMPTS]]
        rows = compare_speculation(model, prompts, ks=[1], batch_sizes=[1], runs=3,
                                   max_new_tokens=self.args.max_new_tokens, threads=self.args.threads)
        (self.run / "speculation.json").write_text(json.dumps(rows, indent=2) + "\n")

    # ---- 7. report ----

    def write_report(self) -> dict:
        a = self.args
        base = json.loads((self.run / "eval_base" / "summary.json").read_text())["metrics"]
        final = json.loads((self.run / "eval_rl" / "summary.json").read_text())["metrics"]
        pre = json.loads((self.run / "pretrain" / "report.json").read_text())
        rl = json.loads((self.run / "grpo" / "report.json").read_text())
        plain, mtp = json.loads((self.run / "speculation.json").read_text())
        wall = sum(self.timings.values())
        total_flops = pre["total_flops"] + rl["total_flops"]
        device_hours = wall / 3600
        k = a.samples
        report = {
            "task": self.task.name, "heldout_size": a.heldout, "size": a.size, "seed": a.seed,
            "parameters": pre["parameters"], "active_parameters": pre["active_parameters"],
            "base_accuracy": base["greedy_accuracy"], "rl_accuracy": final["greedy_accuracy"],
            "gain_points": 100 * (final["greedy_accuracy"] - base["greedy_accuracy"]),
            "base_pass@1_sampled": base["pass@1"], f"base_pass@{k}": base.get(f"pass@{k}"),
            "rl_pass@1_sampled": final["pass@1"], f"rl_pass@{k}": final.get(f"pass@{k}"),
            "pretrain_steps": pre["steps"], "grpo_steps": rl["steps"], "wall_seconds": wall,
            "stage_seconds": self.timings, "total_flops": total_flops, "device": self.device,
            "device_hours": device_hours, "price_per_device_hour": a.price_per_device_hour,
            "estimated_cost": device_hours * a.price_per_device_hour,
            "decode_tokens_per_s": plain["tokens_per_s"], "decode_tokens_per_s_mtp": mtp["tokens_per_s"],
            "mtp_speedup": mtp["speedup"], "mtp_acceptance": mtp["acceptance"],
            "mtp_greedy_identical": mtp["identical"],
        }
        report["plots"] = self.plot()
        reasoning = []
        if self.demo_task.reasoning:
            curve = self.chart_reasoning()
            report["plots"].append("reasoning.png")
            report.update({f"length_growth_{kind}": growth(curve, f"length_{kind}") for kind in ("correct", "incorrect")})
            report.update({f"check_share_{name}": window_mean(curve, "check_share", steps)
                           for name, steps in (("first10", slice(0, 10)), ("last10", slice(-10, None)))})
            reasoning = [
                "| GRPO steps | length of right answers | of wrong answers | with a check step |", "|---|---|---|---|",
                *(f"| {name} 10 | {_tokens(window_mean(curve, 'length_correct', steps))} | "
                  f"{_tokens(window_mean(curve, 'length_incorrect', steps))} | "
                  f"{window_mean(curve, 'check_share', steps):.0%} |"
                  for name, steps in (("first", slice(0, 10)), ("last", slice(-10, None)))), "",
                "![reasoning](reasoning.png)", ""]
        (self.run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = [
            "# openseek demo: R1-Zero in miniature", "",
            f"Task: {self.demo_task.description} ({a.heldout} held-out problems, never seen in pretraining or RL). Model: a "
            f"{report['parameters']:,}-parameter DeepSeek-V3-style model (MLA, MoE 8+1 experts, MTP), pretrained "
            f"for {pre['steps']} steps on a corpus where {a.correct_fraction:.0%} of worked solutions carry "
            f"correctly, then {rl['steps']} GRPO steps with R1's accuracy + format rewards.", "",
            "| | base (pretrained) | after GRPO |", "|---|---|---|",
            f"| greedy accuracy | {base['greedy_accuracy']:.1%} | {final['greedy_accuracy']:.1%} |",
            f"| pass@1 (mean of {k} samples, T=1) | {base['pass@1']:.1%} | {final['pass@1']:.1%} |",
            f"| pass@{k} | {base.get(f'pass@{k}', 0):.1%} | {final.get(f'pass@{k}', 0):.1%} |", "",
            f"Gain: **{report['gain_points']:+.1f} points** of greedy held-out accuracy.", "",
            "| decoding the final model (batch 1, greedy) | tokens/s | |", "|---|---|---|",
            f"| plain | {plain['tokens_per_s']:.0f} | |",
            f"| MTP speculative decoding (1 draft token) | {mtp['tokens_per_s']:.0f} | **{mtp['speedup']:.2f}×**, "
            f"{mtp['acceptance']:.0%} of drafts accepted, greedy outputs "
            f"{'identical' if mtp['identical'] else 'DIFFERENT'} |", "",
            "| cost | |", "|---|---|",
            f"| wall time (whole pipeline) | {wall:.0f} s ({', '.join(f'{n} {s:.0f} s' for n, s in self.timings.items())}) |",
            f"| total training FLOPs | {total_flops:.3g} |",
            f"| device-hours ({self.device}) | {device_hours:.4f} |",
            f"| estimated cost | {report['estimated_cost']:.4f} at {a.price_per_device_hour} per device-hour |", "",
            "![demo](demo.png)", "", *reasoning,
            f"The model: `{self.run / 'model'}` — try `openseek chat --model {self.run / 'model'}`, "
            f"`openseek serve --model {self.run / 'model'}` or `openseek eval --model {self.run / 'model'} --task "
            f"arithmetic`.", "",
        ]
        (self.run / "report.md").write_text("\n".join(lines))
        return report

    def plot(self) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pre = reporting.read_metrics(self.run / "pretrain" / "metrics.jsonl")
        rl = reporting.read_metrics(self.run / "grpo" / "metrics.jsonl")
        curve = json.loads((self.run / "rl_curve.json").read_text())
        base = json.loads((self.run / "eval_base" / "summary.json").read_text())["metrics"]["greedy_accuracy"]
        fig, ax = plt.subplots(1, 4, figsize=(18, 3.6))
        ax[0].plot([m["step"] for m in pre], [m["loss"] for m in pre])
        ax[0].set(title="pretraining loss", xlabel="step", yscale="log")
        ax[1].plot([m["step"] for m in rl], [m.get("reward") for m in rl], label="reward")
        ax[1].plot([m["step"] for m in rl], [m.get("accuracy") for m in rl], label="train accuracy (samples)")
        ax[1].set(title="GRPO reward", xlabel="step")
        ax[1].legend()
        ax[2].plot([0] + [p["step"] for p in curve], [base] + [p["greedy_accuracy"] for p in curve], marker="o")
        ax[2].set(title="held-out greedy accuracy", xlabel="GRPO step", ylim=(0, 1))
        ax[3].plot([m["step"] for m in rl], [m.get("completion_length/mean") for m in rl])
        ax[3].set(title="completion length (tokens)", xlabel="GRPO step")
        fig.tight_layout()
        fig.savefig(self.run / "demo.png", dpi=90)
        plt.close(fig)
        return ["demo.png"]

    def chart_reasoning(self) -> list[dict]:
        """reasoning.jsonl and reasoning.png: per GRPO step, the lengths of right and wrong answers, the shares with a
        check step and with a correction, accuracy and format reward (from the completions GRPO logged), beside the
        held-out accuracy between rounds. Returns the per-step rows."""
        curve = reasoning_curve(self.run / "grpo" / "completions.jsonl")
        (self.run / "reasoning.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
        base = json.loads((self.run / "eval_base" / "summary.json").read_text())["metrics"]["greedy_accuracy"]
        heldout = [(0, base)] + [(p["step"], p["greedy_accuracy"])
                                 for p in json.loads((self.run / "rl_curve.json").read_text())]
        plot_reasoning(curve, heldout, self.run / "reasoning.png")
        return curve

    def run_all(self) -> dict:
        run = self.run
        run.mkdir(parents=True, exist_ok=True)
        n = self.args.samples
        self.stage("data", (run / "data" / "corpus.jsonl").is_file() and (run / "tokenizer").is_dir(), self.make_data)
        self.stage("pretrain", _completed(run / "pretrain"), self.pretrain)
        self.stage("eval base", (run / "eval_base" / "summary.json").is_file(),
                   lambda: self.evaluate(list_checkpoints(run / "pretrain")[-1], run / "eval_base", n))
        self.stage("grpo", self.grpo_done(), self.grpo)
        self.stage("final model", (run / "model").is_dir(), self.final_model)
        self.stage("eval rl", (run / "eval_rl" / "summary.json").is_file(),
                   lambda: self.evaluate(run / "model", run / "eval_rl", n))
        self.stage("speculation", (run / "speculation.json").is_file(), self.measure_speculation)
        return self.write_report()


def compare_speculation(model, prompts: list[list[int]], ks: list[int], batch_sizes: list[int], runs: int,
                        max_new_tokens: int, threads: int | None, compile: bool = False) -> list[dict]:
    """Greedy decoding of `prompts`, `batch_size` at a time, without speculation and with MTP speculation of each
    k, runs alternating (so the machine's state is shared; the order reverses every run, so no engine always runs
    first). One row per (k, batch size), k = 0 being plain: median tokens/s, speed-up over plain at that batch size,
    acceptance rate, mean accepted length, and whether every output equals plain decoding's. Every engine, plain
    and speculative alike, first decodes untimed (warm caches, allocator, thread choice; with `compile`, which makes
    every engine, plain ones too, compile its decode step, every batch size the runs will see). Each side runs at
    the engine's own settings: plain decoding looks for finished rows every FINISH_CHECK_EVERY steps, speculation
    every step (rows gain different numbers of tokens), a cost that is speculation's. (`benchmarks/speculative.py`
    and the demo's report both measure with this.)"""
    configs = [(k, b) for b in batch_sizes for k in [0, *ks]]
    engines = {c: openseek.Engine(model, max_batch_size=c[1], threads=threads, speculative="mtp" if c[0] else None,
                                  num_speculative_tokens=max(c[0], 1), compile=compile) for c in configs}
    seconds = {c: [] for c in configs}
    for c in configs:  # the warm-up: untimed, for every engine
        sizes = range(1, c[1] + 1) if compile else [c[1]]  # compiled: every batch size (rows leave as they finish)
        for size in sizes:
            engines[c].generate(prompts[:size], max_new_tokens, temperature=0, stop_token_ids=[] if compile else None)
        engines[c].stats = type(engines[c].stats)()  # the statistics of the timed runs only
    outputs = {}
    for run in range(runs):
        for c in configs if run % 2 == 0 else reversed(configs):
            started = time.perf_counter()
            outs = [o.token_ids for i in range(0, len(prompts), c[1])
                    for (o,) in engines[c].generate(prompts[i : i + c[1]], max_new_tokens, temperature=0)]
            seconds[c].append(time.perf_counter() - started)
            outputs[c] = outs
    rows = []
    for k, b in configs:
        tokens = sum(map(len, outputs[k, b]))
        stats = engines[k, b].stats
        rows.append({"k": k, "batch": b, "tokens": tokens,
                     "tokens_per_s": tokens / statistics.median(seconds[k, b]),
                     "speedup": statistics.median(seconds[0, b]) / statistics.median(seconds[k, b]),
                     "acceptance": stats.acceptance_rate, "mean_accepted_length": stats.mean_accepted_length,
                     "identical": outputs[k, b] == outputs[0, b]})
    for engine in engines.values():
        engine.close()
    return rows


def _tokens(length: float | None) -> str:
    return "–" if length is None else f"{length:.1f}"


def _completed(run_dir: Path) -> bool:
    report = run_dir / "report.json"
    return report.is_file() and json.loads(report.read_text()).get("status") == "completed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where everything is written (and reused)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="model size preset (tiny learns the task as well as small, in half the time: benchmarks/RESULTS.md)")
    parser.add_argument("--task", choices=sorted(DEMO_TASKS), default="arithmetic",
                        help="arithmetic: 3-digit addition, GRPO picks the rare careful habit; reflection: 3-digit "
                             "additions held out with two carries or more, where RL lengthens the reasoning with a check "
                             "step (openseek/demo_tasks.py; docs/training.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_threads_argument(parser, help="CPU intra-op threads for every stage; auto (default) measures each count on "
                                      "the work and keeps the fastest (both cores: pretraining 1.45x faster than on "
                                      "one, when quiet); a count gives bitwise-reproducible runs")
    parser.add_argument("--precision", default="float32", choices=["auto", "float32", "bf16"],
                        help="training precision (the demo's measured result is float32's)")
    parser.add_argument("--corpus-size", type=int, default=60_000, help="worked solutions in the pretraining corpus")
    parser.add_argument("--correct-fraction", type=float,
                        help="share of corpus solutions that carry correctly (the rest forget carries; default: 0.3; "
                             "reflection: 0.2 checked solutions)")
    parser.add_argument("--pretrain-steps", type=int,
                        help="pretraining steps (default 800: 700 still learns the method, 600 does not, "
                             "benchmarks/RESULTS.md; reflection: 800, as arithmetic)")
    parser.add_argument("--mtp-rows", type=int, default=32,
                        help="pretraining documents per batch that also train the MTP module (half the batch: the "
                             "step 11%% faster, the same held-out gain and draft acceptance: benchmarks/RESULTS.md)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of pretraining (cosine)")
    parser.add_argument("--batch-size", type=int, default=64, help="pretraining documents per step")
    parser.add_argument("--grpo-steps", type=int,
                        help="GRPO steps (default 20: most of the held-out gain comes in the first 10, "
                             "benchmarks/RESULTS.md; reflection: 60)")
    parser.add_argument("--grpo-rounds", type=int, help="held-out checks during GRPO (default 2; reflection: 3)")
    parser.add_argument("--grpo-lr", type=float, help="GRPO's learning rate (default 1e-4; reflection: 5e-5, so that "
                                                      "the change is spread over more steps than the first 10)")
    parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--grpo-prompts", type=int, default=4000, help="training problems for GRPO")
    parser.add_argument("--max-new-tokens", type=int, help="completion length limit (default 48; reflection: 80)")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems for evaluation")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem for pass@k")
    parser.add_argument("--price-per-device-hour", type=float, default=0.10,
                        help="for the cost estimate (a laptop CPU by default)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory and start over")


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.fresh:
        shutil.rmtree(args.run_dir, ignore_errors=True)
    demo = Demo(args)
    args = demo.args
    try:
        report = demo.run_all()
    except KeyboardInterrupt:
        print(f"\ninterrupted — finished stages are kept in {args.run_dir}; run the same command to continue")
        return 130
    print(
        f"\nheld-out greedy accuracy: {report['base_accuracy']:.1%} after pretraining → {report['rl_accuracy']:.1%} "
        f"after GRPO ({report['gain_points']:+.1f} points, {report['heldout_size']} problems); "
        f"{time.perf_counter() - started:.0f} s this run.\n"
        f"report: {demo.run / 'report.md'}\nchat:   openseek chat --model {demo.run / 'model'}"
    )
    return 0
