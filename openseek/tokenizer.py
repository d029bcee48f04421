"""Tokenizer: a `tokenizers` byte-level BPE plus the model directory's chat template, rendered in a Jinja sandbox.

A directory holds `tokenizer.json` and `tokenizer_config.json` (special tokens, `chat_template`) and maybe
`chat_template.jinja`, exactly as transformers writes them, so a model directory moves between openseek and
transformers unchanged. Templates render with the same Jinja settings transformers uses (trim_blocks,
lstrip_blocks, loop controls, a `tojson` that does not escape HTML, `raise_exception`), so the prompt text is the
same text, byte for byte. Models without a template get the built-in DeepSeek-R1 one.

`openseek tokenizer train --input corpus.txt --vocab-size 4096 --output-dir tok/` trains a byte-level BPE.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt leaves the model inside an open `<think>` block (R1's chat template prefills it, so the
    completion carries only the closing tag). The one check used by GRPO rewards, sampling, eval and serve."""
    return prompt.rfind(THINK) > prompt.rfind(END_THINK)

# DeepSeek-R1's conversation format: system text first, then <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>.
# An assistant turn that is not the last message keeps only its answer (the text after </think>), the way R1
# sees its own earlier turns; the last one keeps its reasoning, which SFT trains on. The generation prompt
# opens a <think> block so the model always reasons first.
R1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] -%}"
    "{%- endfor -%}"
    "{{- (bos_token or '') + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] or '' -%}"
    "{%- if loop.last and message.get('reasoning_content') -%}"
    "{%- set content = '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' + content -%}"
    "{%- elif not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + (eos_token or '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<｜Assistant｜><think>\\n' -}}"
    "{%- endif -%}"
)

_REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ValueError):
    """A tokenizer directory or chat that cannot be used; the message names the file or message at fault."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
_JINJA.filters["tojson"] = _tojson
_JINJA.globals["raise_exception"] = _raise_exception
_JINJA.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _JINJA.from_string(template)


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template") or R1_CHAT_TEMPLATE
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"tokenizer_config.json: {name}={token!r} is not in the vocabulary")

    # ---- loading and saving ----------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file}: missing; a model directory needs a tokenizer.json (train one with "
                f"`openseek tokenizer train` or copy it from the base model)"
            )
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise TokenizerError(f"{file}: cannot be read by the tokenizers library: {e}") from None
        config = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{config_file}: line {e.lineno}: invalid JSON: {e.msg}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tokenizer, config, template)

    def save(self, directory) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.update(bos_token=self.bos_token, eos_token=self.eos_token, chat_template=self.chat_template)
        if self.pad_token is not None:
            config["pad_token"] = self.pad_token
        config.setdefault("model_max_length", 1 << 30)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        stale = directory / "chat_template.jinja"  # would override the template we just wrote
        if stale.exists():
            stale.unlink()
        return directory

    # ---- ids and text ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, falling back to EOS (padding is always masked, so its id never matters)."""
        return self.tokenizer.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (no special tokens added)."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------------

    @property
    def template_takes_tools(self) -> bool:
        """The chat template renders tool definitions (reads the `tools` variable), as Qwen2's and most tool-calling
        templates do; R1's does not."""
        return "tools" in jinja2.meta.find_undeclared_variables(_JINJA.parse(self.chat_template))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: list[dict] | None = None, **template_kwargs):
        """Render a conversation to the model's prompt text (or its ids with `tokenize=True`).

        Messages carrying their reasoning as `reasoning_content`, `thinking` or `reasoning` get it under all of
        those names, so templates reading any of them work (transformers does the same). `tools` (OpenAI's
        function definitions, `{"type": "function", "function": {...}}`) reach the template as transformers'
        `apply_chat_template(tools=...)` passes them; assistant `tool_calls` and `role: "tool"` messages are the
        template's to render.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        chat = []
        for m in messages:
            reasoning = next((m[k] for k in _REASONING_NAMES if m.get(k) is not None), None)
            chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        special = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        variables = {k: v for k, v in special.items() if v is not None}
        text = _compile(self.chat_template).render(
            messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **(variables | template_kwargs),
        )
        return self.encode(text) if tokenize else text


# ---- training --------------------------------------------------------------------------------------------------


def train_bpe(texts_or_files: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              chat_template: str | None = None, split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE (every byte is in the alphabet, so nothing is ever unknown).

    `texts_or_files` holds strings or paths of local text files. The special tokens default to R1's
    (BOS, EOS, User, Assistant); `<think>` and `</think>` are always added as ordinary added tokens so they are
    single ids yet survive `decode(skip_special_tokens=True)`. `split_digits` keeps every digit its own token
    (no merges like "12"), which small models need to learn arithmetic column by column; a space before a digit
    stays with it (" 7" may become one token), so a number costs no separate token for its leading space (the
    demo's documents are shorter and its model learns sooner; benchmarks/RESULTS.md, round 12).
    """
    special_tokens = list(special_tokens or [BOS, EOS, USER, ASSISTANT])
    items = list(texts_or_files)
    files = [str(p) for p in items if isinstance(p, Path) or (len(str(p)) < 4096 and Path(str(p)).is_file())]
    texts = [t for t in items if str(t) not in files]
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files:
        tokenizer.train(files, trainer)
    if texts:
        tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([THINK, END_THINK])
    bos, eos = special_tokens[0], special_tokens[1] if len(special_tokens) > 1 else special_tokens[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return Tokenizer(tokenizer, {"bos_token": bos, "eos_token": eos}, chat_template or R1_CHAT_TEMPLATE)


# ---- command line: `openseek tokenizer train` -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on local text files")
    train.add_argument("--input", nargs="+", required=True, help="text files (one document per line or free text)")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--output-dir", required=True)
    train.add_argument("--special-tokens", nargs="*", default=None,
                       help="first is BOS, second EOS (default: R1's BOS, EOS, User, Assistant)")


def main(args: argparse.Namespace) -> int:
    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file")
    tokenizer = train_bpe([Path(p) for p in args.input], args.vocab_size, args.special_tokens)
    directory = tokenizer.save(args.output_dir)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE -> {directory}")
    return 0


def load_tokenizer(tokenizer_dir: str | None, model: str | None) -> Tokenizer:
    """--tokenizer, else the model directory's own tokenizer."""
    if tokenizer_dir is None and model is not None and Path(model).is_dir():
        tokenizer_dir = model
    if tokenizer_dir is None:
        raise TokenizerError("no tokenizer: pass --tokenizer DIR (train one with `openseek tokenizer train`)")
    return Tokenizer.from_dir(tokenizer_dir)
