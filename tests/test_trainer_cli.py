"""`openseek pretrain` and `openseek sft` end to end: recipes, self-contained outputs, and named bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import openseek
from helpers_train import TINY_DEEPSEEK, read_metrics, successor_documents, tiny_tokenizer, write_corpus
from openseek.cli import main
from openseek.data import DataError
from openseek.tokenizer import Tokenizer, TokenizerError
from openseek.train.trainer import list_checkpoints

RECIPES = Path(__file__).parent.parent / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = successor_documents(200)
    write_corpus(root / "docs.txt", docs, "txt")
    tiny_tokenizer(docs).save(root / "tok")
    return root


def test_every_recipe_is_valid():
    from openseek.config import ModelConfig
    from openseek.train import pretrain, sft
    import argparse

    for path in sorted(RECIPES.glob("*.json")):
        recipe = json.loads(path.read_text())
        module = sft if path.name.startswith("sft") else pretrain
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(["--recipe", str(path)])
        model = openseek.flags.apply_recipe(args, module.add_arguments, module.DEFAULTS)
        openseek.train.config.train_config_from_args(args)
        if model is not None:
            ModelConfig.from_hf(dict(model, vocab_size=512), source=path.name)
        assert recipe["description"]


@pytest.mark.parametrize("command, typed, recipe_value, default", [
    ("pretrain", ["--lr", "0.0003"], {"lr": 0.003}, ("lr", 3e-4)),
    ("pretrain", ["--batch-size", "8"], {"batch_size": 16}, ("batch_size", 8)),
    ("grpo", ["--group-size", "8"], {"group_size": 4}, ("group_size", 8)),
    ("grpo", ["--mu", "1"], {"updates_per_rollout": 2}, ("updates_per_rollout", 1)),
    ("grpo", ["--no-dynamic-sampling"], {"dynamic_sampling": True}, ("dynamic_sampling", False)),
])
def test_a_typed_flag_beats_the_recipe_even_at_its_default(tmp_path, command, typed, recipe_value, default):
    """Command line > recipe > defaults: typing the default value is still typing it."""
    import argparse

    from openseek.train import grpo, pretrain

    module = {"pretrain": pretrain, "grpo": grpo}[command]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(recipe_value))
    name, value = default

    def settle(argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(["--recipe", str(recipe), *argv])
        openseek.flags.apply_recipe(args, module.add_arguments, module.DEFAULTS)
        return getattr(args, name)

    assert settle(typed) == value  # typed, equal to the default: wins
    assert settle([]) == recipe_value[name]  # not typed: the recipe's
    recipe.write_text("{}")
    assert settle([]) == value  # neither: the default


def test_pretrain_from_a_recipe_then_sft(corpus, tmp_path):
    run = tmp_path / "pt"
    assert main(["pretrain", "--recipe", str(RECIPES / "pretrain-tiny-moe.json"), "--tokenizer",
                 str(corpus / "tok"), "--data", str(corpus / "docs.txt"), "--steps", "30", "--seq-len", "64",
                 "--batch-size", "4", "--warmup-steps", "3", "--run-dir", str(run), "--no-progress"]) == 0
    metrics = read_metrics(run)
    assert len(metrics) == 30 and metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert metrics[-1]["lr"] == pytest.approx(0.003 * 0.1)  # the recipe's lr and floor; steps from the flag
    checkpoint = list_checkpoints(run)[-1]
    model = openseek.load(checkpoint)
    tok = Tokenizer.from_dir(checkpoint)
    assert model.cfg.vocab_size == tok.vocab_size and model.cfg.eos_token_id == [tok.eos_token_id]
    assert model.cfg.num_nextn_predict_layers == 1 and model.cfg.n_routed_experts == 8
    assert json.loads((run / "report.json").read_text())["status"] == "completed"

    docs = successor_documents(40, seed=5)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "continue: " + " ".join(d.split()[:2])},
        {"role": "assistant", "content": "<think>\nnext words\n</think>\n\n" + " ".join(d.split()[2:6])},
    ]}) + "\n" for d in docs))
    sft_run = tmp_path / "sft"
    assert main(["sft", "--recipe", str(RECIPES / "sft-r1-tiny.json"), "--model", str(checkpoint), "--data",
                 str(chats), "--steps", "15", "--batch-size", "4", "--lr", "3e-3", "--run-dir", str(sft_run),
                 "--no-progress"]) == 0
    sft_metrics = read_metrics(sft_run)
    assert sft_metrics[-1]["loss"] < sft_metrics[0]["loss"]
    assert Tokenizer.from_dir(list_checkpoints(sft_run)[-1]).chat_template == tok.chat_template


def test_bad_input_is_named(corpus, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(TINY_DEEPSEEK))
    common = ["--run-dir", str(tmp_path / "run"), "--steps", "2", "--no-progress"]
    base = [*common, "--seq-len", "16"]
    with pytest.raises(TokenizerError, match="no tokenizer: pass --tokenizer"):
        main(["pretrain", "--model", str(config), "--data", str(corpus / "docs.txt"), *base])
    with pytest.raises(TokenizerError, match=r"nowhere/tokenizer\.json: missing"):
        main(["pretrain", "--model", str(config), "--tokenizer", str(tmp_path / "nowhere"), "--data",
              str(corpus / "docs.txt"), *base])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ban bas"}) + "\n{oops\n")
    args = ["pretrain", "--model", str(config), "--tokenizer", str(corpus / "tok"), "--data", str(bad), *base]
    with pytest.raises(DataError, match=rf"{bad}:2: .*--skip-bad-lines"):
        main(args)
    assert main([*args, "--skip-bad-lines", "--run-dir", str(tmp_path / "skip")]) == 0
    assert read_metrics(tmp_path / "skip")[-1]["data/skipped_lines"] == 1

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{chats}:1: conversation has no assistant message"):
        main(["sft", "--model", str(config), "--tokenizer", str(corpus / "tok"), "--data", str(chats), *common])

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(ValueError, match=rf"{recipe}: unknown setting 'learning_rate'"):
        main(["pretrain", "--recipe", str(recipe), "--data", str(bad)])


def test_finite_data_stops_cleanly(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", str(RECIPES / "pretrain-tiny-moe.json"), "--tokenizer", str(corpus / "tok"),
                 "--data", str(corpus / "docs.txt"), "--epochs", "1", "--steps", "1000", "--seq-len", "64",
                 "--batch-size", "8", "--run-dir", str(run), "--no-progress"]) == 0
    tokens = sum(len(Tokenizer.from_dir(corpus / "tok").encode(d)) + 1 for d in successor_documents(200))
    steps = tokens // 65 // 8  # whole rows of 65 tokens, whole batches of 8 rows
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == f"data exhausted after step {steps}" and report["steps"] == steps
    assert [p.name for p in list_checkpoints(run)][-1] == f"step_{steps:08d}"
