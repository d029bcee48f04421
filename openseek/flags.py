"""Command-line flags shared by the commands: one flag per config dataclass field, recipes, and the precision,
threads, compile, reasoning-budget and engine flags (cli.py's commands declare the rest themselves)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from openseek.quantize import GROUP_SIZES, QUANTIZE
from openseek.threads import parse_threads


def add_config_arguments(parser, config_class, title: str, help: dict[str, str] | None = None,
                         aliases: dict[str, list[str]] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass (--run-dir, --steps, --lr, ...), typed from its default (from its
    annotation when the default is None). Every flag is declared without a default (argparse.SUPPRESS): only what
    the user typed appears in the parsed namespace, and `apply_recipe` settles the rest."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        default = f.default
        help_ = (help or {}).get(f.name, "")
        if "default:" not in help_:
            help_ = f"{help_} (default: {default})".strip()
        if isinstance(default, bool):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        elif isinstance(default, tuple):
            group.add_argument(*flags, dest=f.name, type=float, nargs=len(default), default=argparse.SUPPRESS,
                               help=help_)
        else:
            typed = type(default) if default is not None else next(
                (a for a in typing.get_args(hints[f.name]) if a is not type(None)), float)
            kind = {int: int, float: float, str: str}.get(typed, float)
            group.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_)


def config_from_args(config_class, args):
    """The dataclass from the settled flags (after `apply_recipe`); fields whose flag is None keep its default."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_class)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
    return config_class(**values)


def config_defaults(*config_classes) -> dict:
    """{field: default} of config dataclasses, the later ones winning: what `apply_recipe` falls back to."""
    return {f.name: f.default for config_class in config_classes for f in dataclasses.fields(config_class)}


def apply_recipe(args, add_arguments, defaults: dict) -> dict | None:
    """Settle every flag, explicitly: typed on the command line > `--recipe file.json` > `defaults` (a stage's: its
    config dataclasses' defaults, `config_defaults`, and its own where they differ). A flag the user typed wins
    even when it equals its default, because the parser declares no defaults (see `add_config_arguments`): what
    was not typed is absent from `args`.

    A recipe is a flat JSON object of flag names (underscores or dashes) plus an optional "model" object: the
    transformers config of a model trained from scratch, which is returned (or None). Every flag still unset at
    the end is None.
    """
    reference = argparse.ArgumentParser()
    add_arguments(reference)
    known = {a.dest for a in reference._actions if a.dest != "help"}
    model = None
    if getattr(args, "recipe", None):
        path = Path(args.recipe)
        try:
            recipe = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: recipe not found (see recipes/ for examples)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        model = recipe.pop("model", None)
        recipe.pop("description", None)
        for key, value in recipe.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{path}: unknown setting {key!r}")
            if not hasattr(args, name):
                setattr(args, name, value)
    for name in known | set(defaults):
        if not hasattr(args, name):
            setattr(args, name, defaults.get(name))
    return model


def add_stage_arguments(parser, model_help: str) -> None:
    """The flags every training stage starts with: --recipe, --model, --tokenizer."""
    parser.add_argument("--recipe", help="JSON file of settings for these flags (flags given here win; see recipes/)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")


def add_data_arguments(parser, data_help: str, batch_help: str) -> None:
    """--data, how to read it and how much of it a micro-step takes, for pretraining and SFT."""
    parser.add_argument("--data", nargs="+", help=data_help)
    parser.add_argument("--batch-size", type=int, help=batch_help)
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    parser.add_argument("--epochs", type=int,
                        help="passes over the data before stopping (default: cycle until --steps)")


def add_precision_arguments(parser) -> None:
    """`--dtype`, `--quantize` and `--group-size`: the same precision choices on serve, chat, eval and sample."""
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="weights and activations dtype (default: the checkpoint's; eval on GPU: bfloat16)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE,
                        help="weight-only quantisation of the linear layers: int8 per channel, int4 per group "
                             "(CPU kernels; best with --dtype bfloat16)")
    parser.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4 group size")


def add_compile_argument(parser) -> None:
    """`--compile` and `--cuda-graphs`: the Engine's decode step through torch.compile, and replayed as CUDA graphs
    (serve, chat, eval, sample)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (fuses its small ops; compiles for a minute or two first)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the decode step as CUDA graphs (--device cuda only; with --compile, of the "
                             "compiled step)")


THREADS_HELP = ("intra-op threads; auto (default) measures the work at each count and keeps the fastest, again and "
                "again as the machine's load changes")


def add_threads_argument(parser, help: str = THREADS_HELP) -> None:
    parser.add_argument("--threads", type=parse_threads, default=None, metavar="N|auto", help=help)


def add_reasoning_budget_argument(parser) -> None:
    """--reasoning-budget, for `serve` and `chat`."""

    def budget(text: str) -> int:
        value = int(text)
        if value < 0:
            raise ValueError(text)
        return value

    budget.__name__ = "token count >= 0"  # what argparse says of a bad value
    parser.add_argument("--reasoning-budget", type=budget, metavar="N",
                        help="close the <think> block after N tokens of reasoning unless a request sets its own "
                             "(thinking_budget_tokens, reasoning_effort); default: unbounded")


def add_engine_arguments(parser) -> None:
    """How `serve` and `chat` run the Engine: speculation, the reasoning budget, precision, compile and device."""
    parser.add_argument("--speculative", choices=["mtp"],
                        help="speculative decoding: 'mtp' drafts with the model's own MTP module (same outputs)")
    parser.add_argument("--num-speculative-tokens", type=int, default=1, help="tokens drafted per step (k)")
    add_reasoning_budget_argument(parser)
    add_precision_arguments(parser)
    add_compile_argument(parser)
    parser.add_argument("--device", default="auto", help="auto (the GPU when available, else cpu) | cpu | cuda[:N]")
