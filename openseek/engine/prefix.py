"""Prefix caching: the cache contents of recently served sequences, so a request whose prompt starts with the same
tokens (the next turn of a chat, a shared system prompt, the G samples of a GRPO group) copies them into its row
instead of prefilling them again.

An entry is a token sequence and its cached keys/values (`Cache.copy_out`): every prompt when it is prefilled, and
prompt + answer when a request finishes. A lookup finds the entry sharing the longest common token prefix with the
new prompt (any common prefix works: a token's keys/values depend only on the tokens before it). Memory is bounded
by `capacity` tokens over all entries, the least recently used entry going first; an entry that another one
extends is dropped. Keys and values depend on the LoRA adapter that computed them (multi_lora.py), so an entry
serves only requests of its own adapter. The cache belongs to the Engine's serving thread, which alone touches it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"prefix cache capacity must be >= 1 token, got {capacity}")
        self.capacity = capacity
        # key -> (adapter, token ids, cached keys/values); least recently used first
        self.entries: OrderedDict[int, tuple[int, torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self.tokens = 0  # held over all entries
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found cached (not prefilled again)
        self._next_key = 0

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def _longest(self, ids: torch.Tensor, adapter: int) -> tuple[int | None, int]:
        """The entry of `adapter` sharing the longest common prefix with `ids`, and that length."""
        best, best_len = None, 0
        for key, (owner, tokens, _) in self.entries.items():
            if owner != adapter:
                continue
            n = min(len(tokens), len(ids))
            differ = (tokens[:n] != ids[:n]).nonzero()
            common = int(differ[0, 0]) if len(differ) else n
            if common > best_len:
                best, best_len = key, common
        return best, best_len

    def load(self, prompt: list[int], cache, row: int, adapter: int = 0) -> int:
        """Copy the longest prefix of `prompt` cached under `adapter` (at most all of it but the last token, which
        the first decode step feeds) into cache row `row`; returns its length (0: nothing cached)."""
        self.queried_tokens += len(prompt)
        key, common = self._longest(torch.tensor(prompt[:-1], dtype=torch.long), adapter)
        if key is None:
            return 0
        self.entries.move_to_end(key)
        cache.copy_in(row, self.entries[key][2], common)
        self.hit_tokens += common
        return common

    def save(self, token_ids: list[int], cache, row: int, adapter: int = 0) -> None:
        """Keep cache row `row`, which holds `token_ids` at slots [0, len) computed under `adapter`, unless an entry
        of that adapter already covers it."""
        n = len(token_ids)
        if n == 0 or n > self.capacity:
            return
        ids = torch.tensor(token_ids, dtype=torch.long)
        for key, (owner, tokens, _) in list(self.entries.items()):
            if owner != adapter:
                continue
            shorter, longer = (tokens, ids) if len(tokens) <= n else (ids, tokens)
            if torch.equal(longer[: len(shorter)], shorter):
                if shorter is ids:  # already covered
                    self.entries.move_to_end(key)
                    return
                self._drop(key)  # the new sequence extends this entry
        while self.tokens + n > self.capacity:
            self._drop(next(iter(self.entries)))
        self.entries[self._next_key] = (adapter, ids, cache.copy_out(row, n))
        self._next_key += 1
        self.tokens += n

    def _drop(self, key: int) -> None:
        _, tokens, _ = self.entries.pop(key)
        self.tokens -= len(tokens)
