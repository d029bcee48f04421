"""Training data: streamed readers (text, JSONL, Parquet), pretraining packing, SFT conversations with loss masks.

Everything streams: files are read a line or a Parquet batch at a time, so a corpus larger than memory works.
Every source is an iterator with `state_dict()` / `load_state_dict()` holding its exact position (epoch, file,
document, token), which the trainer saves in checkpoints so `--resume` continues from the same token.

- `.txt`: documents separated by blank lines. `.jsonl`: one JSON object per line, text in `text_field`
  (default "text") or conversations in "messages". `.parquet`: a column named `text_field` (or "messages").
- Pretraining (`PackedRows`): documents tokenized, each followed by EOS, concatenated and cut into rows of
  `seq_len + 1` tokens (inputs are the first `seq_len`, targets the last `seq_len`).
- SFT (`ConversationRows`): each conversation rendered with the chat template; labels are -100 except on
  assistant turns (their content and closing EOS), so the loss trains only what the model should say.
- `Batches` groups rows into micro-batches and gives each data-parallel rank its own slice of every global batch,
  so N processes see exactly the rows one process would see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from openseek.tokenizer import Tokenizer

IGNORE = -100  # label of tokens that carry no loss
SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad training data; the message names the file and line (or row)."""


def expand_paths(paths) -> list[Path]:
    """Files and directories (searched for .txt/.jsonl/.parquet, sorted) -> the list of data files."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{p}: no .txt, .jsonl or .parquet files in this directory")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DataError(f"{p}: unsupported data file type {p.suffix!r} (use .txt, .jsonl or .parquet)")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


class Records:
    """Streams the records (a text string or a messages list) of many files, with the location of each.

    A malformed JSONL line raises `DataError` naming file and line, unless `skip_bad_lines`; `.skipped` counts the
    distinct lines skipped (a line skipped again in a later epoch counts once).
    """

    def __init__(self, paths, field: str = "text", skip_bad_lines: bool = False):
        self.files = expand_paths(paths)
        self.field, self.skip_bad_lines, self._skipped = field, skip_bad_lines, set()

    @property
    def skipped(self) -> int:
        return len(self._skipped)

    def read(self, file_index: int, start: int = 0) -> Iterator[tuple[int, str | list, str]]:
        """(record index, record, "file:line") of one file, from record `start` on."""
        path = self.files[file_index]
        if path.suffix == ".txt":
            yield from self._text(path, start)
        elif path.suffix == ".jsonl":
            yield from self._jsonl(path, start)
        else:
            yield from self._parquet(path, start)

    def _text(self, path, start):
        index, lines, first = 0, [], 1
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    if not lines:
                        first = lineno
                    lines.append(line)
                    continue
                if lines:
                    if index >= start:
                        yield index, "".join(lines).rstrip("\n"), f"{path}:{first}"
                    index, lines = index + 1, []
        if lines and index >= start:
            yield index, "".join(lines).rstrip("\n"), f"{path}:{first}"

    def _jsonl(self, path, start):
        index = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                if index < start:  # resuming: skip without parsing
                    index += 1
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(raw)
                    value = self._field(record, where)
                except (json.JSONDecodeError, UnicodeDecodeError, DataError) as e:
                    if not self.skip_bad_lines:
                        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e).removeprefix(where + ": ")
                        raise DataError(f"{where}: {reason} (pass --skip-bad-lines to skip such lines)") from None
                    self._skipped.add(where)
                    continue
                yield index, value, where
                index += 1

    def _field(self, record, where):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in (self.field, "messages") if self.field == "text" else (self.field,):
            if name in record:
                return record[name]
        raise DataError(f"{where}: no {self.field!r} field (fields: {', '.join(record) or 'none'})")

    def _parquet(self, path, start):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        column = self.field if self.field in names else "messages" if "messages" in names else None
        if column is None:
            raise DataError(f"{path}: no {self.field!r} column (columns: {', '.join(names)})")
        index = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if index + rows <= start:  # resuming: skip whole row groups unread
                index += rows
                continue
            for value in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
                if index >= start:
                    yield index, value, f"{path}:row {index}"
                index += 1


class _Resumable:
    """Walks the files epoch after epoch from a saved position {epoch, file, record}."""

    def __init__(self, records: Records, epochs: int | None):
        self.records, self.epochs = records, epochs
        self.position = {"epoch": 0, "file": 0, "record": 0}

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)
        self._stream = None

    def _walk(self):
        """((epoch, file, record index), record, where) from the saved position on."""
        epoch, file, record = self.position["epoch"], self.position["file"], self.position["record"]
        while self.epochs is None or epoch < self.epochs:
            while file < len(self.records.files):
                for index, value, where in self.records.read(file, record):
                    yield (epoch, file, index), value, where
                file, record = file + 1, 0
            epoch, file = epoch + 1, 0

    def __iter__(self):
        return self


class PackedRows(_Resumable):
    """Pretraining rows: documents + EOS concatenated, cut into `seq_len + 1`-token rows (no padding, no loss)."""

    def __init__(self, records: Records, tokenizer: Tokenizer, seq_len: int, epochs: int | None = None):
        super().__init__(records, epochs)
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; packing needs one to separate documents")
        self.tokenizer, self.seq_len, self.eos = tokenizer, seq_len, tokenizer.eos_token_id
        self.position["token"] = 0  # tokens of the current record already in earlier rows
        self._stream = None

    def _documents(self):
        """(position of the document, its tokens + EOS), tokenizing a few hundred documents at a time."""
        pending = []
        for pos, text, where in self._walk():
            if not isinstance(text, str):
                raise DataError(f"{where}: expected text for pretraining, got {type(text).__name__}")
            pending.append((pos, text))
            if len(pending) == 256:
                yield from self._encode(pending)
                pending = []
        yield from self._encode(pending)

    def _encode(self, pending):
        for (pos, _), ids in zip(pending, self.tokenizer.encode_batch([text for _, text in pending])):
            yield pos, ids + [self.eos]

    def __next__(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = self._documents()
            self._current = None  # [position, tokens, offset of the next unused token]
            skip = self.position["token"]  # resuming inside a document
        else:
            skip = 0
        row = []
        while len(row) < self.seq_len + 1:
            if self._current is None:
                pos, tokens = next(self._stream)  # StopIteration ends a finite number of epochs
                self._current, skip = [pos, tokens, skip], 0
            pos, tokens, offset = self._current
            take = tokens[offset: offset + self.seq_len + 1 - len(row)]
            row += take
            self._current[2] = offset + len(take)
            if self._current[2] == len(tokens):
                self._current = None
        epoch, file, record = pos
        if self._current is None:  # the next row starts with the next document
            self.position.update(epoch=epoch, file=file, record=record + 1, token=0)
        else:
            self.position.update(epoch=epoch, file=file, record=record, token=self._current[2])
        return torch.tensor(row)


class ConversationRows(_Resumable):
    """SFT rows: (input ids, labels) of one conversation; labels are IGNORE outside assistant turns.

    Each assistant turn i is found by rendering the conversation up to turn i: the text after the generation
    prompt up to the end of the turn is trained. Turns the template rewrites later (R1 drops the reasoning of
    earlier turns) are not trained, since their text is not in the final rendering. Conversations longer than
    `max_len` tokens are cut, and counted in `.truncated`.
    """

    def __init__(self, records: Records, tokenizer: Tokenizer, max_len: int, epochs: int | None = None):
        super().__init__(records, epochs)
        self.tokenizer, self.max_len, self.truncated = tokenizer, max_len, 0
        self._stream = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stream is None:
            self._stream = self._walk()
        (epoch, file, record), messages, where = next(self._stream)
        self.position.update(epoch=epoch, file=file, record=record + 1)
        ids, labels = encode_conversation(self.tokenizer, messages, where)
        if len(ids) > self.max_len:
            ids, labels = ids[: self.max_len], labels[: self.max_len]
            self.truncated += 1
        return torch.tensor(ids), torch.tensor(labels)


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant message, so there is nothing to train on")


def encode_conversation(tokenizer: Tokenizer, messages, where: str = "conversation") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the assistant turns' tokens."""
    check_messages(messages, where)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(turn):
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        start = next((j for j, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
        spans.append((start, len(turn)))
    if not spans:
        raise DataError(f"{where}: no assistant turn survives the chat template, so there is nothing to train on")
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


# ---- batches ---------------------------------------------------------------------------------------------------


def collate_packed(rows: list[torch.Tensor]) -> dict:
    stacked = torch.stack(rows)
    return {"input_ids": stacked[:, :-1], "labels": stacked[:, 1:]}


def collate_conversations(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    """Right-padded inputs and next-token labels (IGNORE on padding and non-assistant tokens)."""
    length = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids) - 1] = ids[:-1]
        labels[r, : len(ids) - 1] = lab[1:]
    return {"input_ids": input_ids, "labels": labels}


class Batches:
    """Micro-batches of `batch_size` rows for this rank: each global micro-batch is `world_size * batch_size`
    consecutive rows and rank r takes slice r, so any number of processes sees the same global batches."""

    def __init__(self, rows, batch_size: int, collate: Callable, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.collate = rows, batch_size, collate
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [next(self.rows) for _ in range(self.batch_size * self.world_size)]
        return self.collate(rows[self.rank * self.batch_size: (self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)

    def counts(self) -> dict[str, float]:
        """What `Trainer.fit` adds to each step's metrics: the epoch, skipped bad lines, truncated conversations."""
        out = {"data/epoch": float(self.rows.position["epoch"])}
        out["data/skipped_lines"] = float(self.rows.records.skipped)
        if hasattr(self.rows, "truncated"):
            out["data/truncated"] = float(self.rows.truncated)
        return out
