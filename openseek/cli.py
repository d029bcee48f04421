"""`openseek <command>`: a thin dispatcher. Each command lives in the module that does the work and provides
`add_arguments(parser)` and `main(args)`; modules are imported only when their command runs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import openseek

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("openseek.demo", "the main job: R1-Zero in miniature on a CPU (pretrain, GRPO, measured gain)"),
    "tokenizer": ("openseek.tokenizer", "train a byte-level BPE tokenizer on local files"),
    "pretrain": ("openseek.train.pretrain", "pretrain a model on local text (packed sequences)"),
    "sft": ("openseek.train.sft", "supervised fine-tuning on chat `messages` JSONL (loss on assistant tokens)"),
    "grpo": ("openseek.train.grpo", "reinforce reasoning with GRPO / Dr. GRPO / DAPO on verifiable rewards"),
    "merge": ("openseek.merge", "merge a LoRA adapter (PEFT's format) into its base model: a full HF model"),
    "sample": ("openseek.train.sample", "rejection sampling: keep completions a reward accepts, write SFT JSONL"),
    "eval": ("openseek.evaluate", "evaluate with R1's protocol: pass@1 over n samples, pass@k, maj@k"),
    "serve": ("openseek.serve.app", "serve a model privately with an OpenAI-compatible API and a chat page"),
    "chat": ("openseek.chat", "chat with a model in the terminal"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: openseek <command> [options]\n\n"
        "The open, efficient reasoning-model stack.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "options:\n  -h, --help     show this message\n  --version      show the version\n\n"
        "`openseek <command> --help` describes a command's options.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    if argv[0] == "--version":
        print(f"openseek {openseek.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"openseek: unknown command {command!r}\n\n{_usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"openseek {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    return module.main(parser.parse_args(rest)) or 0


if __name__ == "__main__":
    sys.exit(main())
