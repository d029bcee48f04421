"""One batch of rows of a preallocated cache, decoded together (`Batch`): prefill, the one decode step (with MTP
speculation: draft, verify, accept) and row compaction, under both batch generation and the serving thread."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openseek.engine.cache import make_cache
from openseek.engine.compile import GraphedDecode
from openseek.engine.sampling import Sampler, SamplingParams
from openseek.multi_lora import BASE, adapter_set


@dataclass
class SpeculationStats:
    """Speculative decoding so far: row-steps verified (each drafts k tokens and gains its accepted drafts plus one
    token of the main model), draft tokens verified and, of those, accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a row gains per step: 1 + accepted drafts (k + 1 at most)."""
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0

    def record(self, counts: torch.Tensor, drafts: int) -> None:
        """counts [rows]: the tokens each live row gained in one step."""
        rows, gained = len(counts), int(counts.sum())
        self.steps, self.drafted, self.accepted = self.steps + rows, self.drafted + drafts * rows, \
            self.accepted + gained - rows


@dataclass
class _Decoded:
    """What one decode step gives each of its rows, on the device: tokens [rows, T] (T = 1, or k + 1 when
    speculating) of which the first counts[row] are new (the rest are rejected drafts), their log-probs [rows, T]
    and top log-probs (values, ids) [rows, T, top] when asked (else None)."""

    tokens: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


_FREE = SamplingParams(0.0)  # the parameters of a free row (its tokens are never used)


class Batch:
    """Rows [0, size) of one preallocated cache, decoded together: batch `generate` and the serving thread both
    run on it. `admit` prefills prompts into rows, `step` is the decode step (one new token for every row),
    `keep` compacts the rows (finished ones leave; `generate`), `vacate` frees rows for later admissions (serve).

    Per row: its owner (None = a free row), its sampling parameters, its LoRA adapter (multi_lora.py; 0 = the base
    model, which is every row's when the model has no adapter set), the token it feeds next and that token's
    position (device tensors `tokens`, `slots`: a step needs no host sync; `positions` is the host copy). A
    token's slot is its position (cache.py). Free rows decode a dummy token at slot 0 and do not advance; free
    rows at the end are dropped, so `size` is 0 when no row is owned. When speculating (k = `draft_tokens` > 0),
    each row also carries `mtp_state` [1, H]: the MTP module's output at the position before its token, which the
    next step drafts from (zeros for a one-token prompt: its first draft is a guess, which changes no output).
    """

    def __init__(self, model, forwards: tuple, draft_tokens: int, capacity: int, max_len: int,
                 compiled: bool = False, graphs: GraphedDecode | None = None):
        """forwards: (decode forward, MTP forward with logits), eager or compiled (compile.py); draft_tokens: k
        drafted per step (0 = no speculation); capacity rows of max_len tokens. graphs: the plain decode step as CUDA
        graphs over their own cache, which the batch then uses (its capacity and max_len are the cache's)."""
        self.model, self.device = model, model.device
        self.decode_forward, self.mtp_forward = forwards
        self.draft_tokens = draft_tokens
        self.graphs = graphs
        self.cache = graphs.cache if graphs else make_cache(model.cfg, capacity, max_len, model.dtype, self.device,
                                                            mtp_layers=1 if draft_tokens else 0)
        self.cache.compiled = compiled
        self.mtp_state = torch.zeros(0, 1, model.cfg.hidden_size, dtype=model.dtype, device=self.device)
        self.owner: list = []
        self.params: list[SamplingParams] = []
        self.adapters: list[int] = []
        self.adapter_set = adapter_set(model)  # None: no adapters to choose between
        self.positions: list[int] = []
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)
        self._sampler: Sampler | None = None  # built from `params` when the rows change
        # when speculating, the next step's first draft logits [size, V] (from `mtp_state`), made by the last step's
        # MTP pass; None after the rows change, when the step makes them itself
        self._draft_logits: torch.Tensor | None = None
        self._advance = 1  # how far each row's slot moves per step: 1, or 0 for free rows ([size] tensor)
        self._vacated = False  # rows were freed since the device tensors were last brought up to date

    @property
    def size(self) -> int:
        return len(self.owner)

    def free_rows(self, count: int) -> list[int]:
        """The first `count` rows free for admission (holes first, then rows past the end)."""
        free = [i for i, o in enumerate(self.owner) if o is None]
        return (free + list(range(self.size, self.cache.rows)))[:count]

    def admit(self, prompts: list[list[int]], src: list[int], rows: list[int], params, owners,
              starts: list[int] | None = None, all_hidden: bool = False,
              adapters: list[int] | None = None) -> list[torch.Tensor] | None:
        """Row rows[i] starts prompts[src[i]] for owners[i] with params[i] and adapter adapters[i] (default: the
        base; the rows of one prompt share its adapter, which its prefill used). One prefill per prompt (n samples of a
        prompt are n rows with the same src) stores each prompt but its last token; the first step feeds that.
        starts[i] (default 0): tokens of the prompt already in row rows[i] (a cached prefix); only the rest is
        prefilled. With `all_hidden`, returns per row the prefill's final hidden states [len(prompt) - 1 - starts[i],
        H]: those of positions starts[i].. (each predicts the token after it), for scoring the prompt. Hidden states,
        not logits: [T, V] float32 logits for every admitted prompt would be rows × length × vocabulary (tens of GB
        for 30 long prompts at V = 152k); the scorer applies the head a chunk at a time to the rows that asked."""
        self._update()
        grow = max(rows) + 1 - self.size
        if grow > 0:
            self.owner += [None] * grow
            self.params += [_FREE] * grow
            self.adapters += [BASE] * grow
            self.positions += [0] * grow
            zeros = torch.zeros(grow, dtype=torch.long, device=self.device)
            self.tokens, self.slots = torch.cat((self.tokens, zeros)), torch.cat((self.slots, zeros))
            self.mtp_state = torch.cat((self.mtp_state, self.mtp_state.new_zeros(grow, *self.mtp_state.shape[1:])))
        index = torch.tensor(rows, device=self.device)
        starts = starts or [0] * len(rows)
        adapters = adapters or [BASE] * len(rows)
        prompt_adapter = {}
        for i, p in enumerate(src):
            if prompt_adapter.setdefault(p, adapters[i]) != adapters[i]:
                raise ValueError(f"prompt {p} is admitted under adapters {prompt_adapter[p]} and {adapters[i]}: "
                                 "the rows of one prompt share its prefill, so they share its adapter")
        hidden = [None] * len(rows)
        fresh = [i for i, start in enumerate(starts) if start == 0]
        if fresh:
            used = sorted({src[i] for i in fresh})
            self._use_adapters([prompt_adapter[p] for p in used])
            out = self._prefill([prompts[p] for p in used], torch.tensor([used.index(src[i]) for i in fresh],
                                device=self.device), index[fresh], all_hidden)
            for i in fresh if all_hidden else ():
                hidden[i] = out[used.index(src[i]), : len(prompts[src[i]]) - 1]
        continuing = [i for i, start in enumerate(starts) if start > 0]
        if continuing:
            self._use_adapters([adapters[i] for i in continuing])
            out = self._extend([prompts[src[i]] for i in continuing], [starts[i] for i in continuing],
                               index[continuing], all_hidden)
            for j, i in enumerate(continuing if all_hidden else ()):
                hidden[i] = out[j, : len(prompts[src[i]]) - 1 - starts[i]]
        last = torch.tensor([prompts[s][-1] for s in src], device=self.device)
        position = [len(prompts[s]) - 1 for s in src]
        self.tokens = self.tokens.index_copy(0, index, last)
        self.slots = self.slots.index_copy(0, index, torch.tensor(position, device=self.device))
        for row, owner, p, pos, adapter in zip(rows, owners, params, position, adapters):
            self.owner[row], self.params[row], self.positions[row], self.adapters[row] = owner, p, pos, adapter
        self._sampler = None
        self._draft_logits = None
        return hidden if all_hidden else None

    def _use_adapters(self, adapters: list[int]) -> None:
        """The LoRA adapter of each row of the next forward (nothing to do on a model without an adapter set)."""
        if self.adapter_set is not None:
            self.adapter_set.select(adapters)

    def _prefill(self, prompts: list[list[int]], src: torch.Tensor, dest: torch.Tensor, all_hidden: bool):
        """Store each prompt but its last token into its cache rows: prompts[src[i]] goes to cache row dest[i].
        Prompts are right-padded, so each starts at slot/position 0. Returns the final hidden states [P, T, H] with
        `all_hidden`, else None."""
        heads = [p[:-1] for p in prompts]
        T = max(len(h) for h in heads)
        if T == 0:
            self._set_mtp_state(dest, None, src, [])
            return torch.zeros(len(prompts), 0, self.model.cfg.hidden_size, device=self.device)
        ids = torch.zeros(len(heads), T + 1, dtype=torch.long)  # the prompt; column t + 1 is the token after t
        real = torch.zeros(len(heads), T, dtype=torch.bool)
        for i, (p, h) in enumerate(zip(prompts, heads)):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            real[i, : len(h)] = True
        self.cache.prefill(src, dest)
        padding = None if bool(real.all()) else real.to(self.device)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0).to(self.device)  # pads repeat the last position
        return self._forward(ids.to(self.device), positions, padding, all_hidden, dest, src,
                             [len(h) - 1 for h in heads])

    def _extend(self, prompts: list[list[int]], starts: list[int], dest: torch.Tensor, all_hidden: bool):
        """Store prompts[i][starts[i]:-1] into cache row dest[i], which holds the prompt's first starts[i] tokens
        already: each token attends to those and to the ones before it. Rows are right-padded; a pad goes to the
        slot of its prompt's last token, which the first decode step overwrites. Returns the final hidden states
        [P, T, H] with `all_hidden`, else None."""
        T = max(len(p) - 1 - start for p, start in zip(prompts, starts))
        if T == 0:
            return torch.zeros(len(prompts), 0, self.model.cfg.hidden_size, device=self.device)
        ids = torch.zeros(len(prompts), T + 1, dtype=torch.long)  # column t + 1 is the token after t
        slots = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, (p, start) in enumerate(zip(prompts, starts)):
            ids[i, : len(p) - start] = torch.tensor(p[start:], dtype=torch.long)
            slots[i] = (torch.arange(start, start + T)).clamp(max=len(p) - 1)
        slots = slots.to(self.device)
        self.cache.decode(slots, length=int(slots.max()) + 1, rows=dest)
        rows = torch.arange(len(prompts), device=self.device)
        return self._forward(ids.to(self.device), slots, None, all_hidden, dest, rows,
                             [len(p) - 2 - start for p, start in zip(prompts, starts)])

    def _forward(self, ids, positions, padding_mask, all_hidden: bool, dest, src, last: list[int]):
        """The prefill forward over the cache of ids[:, :-1] (at `positions`), without the head: generation reads no
        prefill logits (the first decode step feeds the prompt's last token). Returns the final hidden states
        [P, T, H] with `all_hidden`, else None. When speculating, the MTP module then runs over the same
        positions, each seeing the token after it (ids[:, 1:]), which fills its cache layer, and its output at
        index last[src[i]] becomes the state of cache row dest[i] (the position before the prompt's last token)."""
        last_only = not (all_hidden or self.draft_tokens)
        hidden = self.model.hidden_states(ids[:, :-1], positions, padding_mask, self.cache, last_only)
        if self.draft_tokens:
            mtp = self.model.mtp_hidden(0, hidden, ids[:, 1:], positions, padding_mask, self.cache)
            self._set_mtp_state(dest, mtp, src, last)
        return hidden if all_hidden else None

    def _set_mtp_state(self, dest: torch.Tensor, mtp: torch.Tensor | None, src, last: list[int]) -> None:
        """Row dest[i] drafts next from mtp[src[i], last[src[i]]] (zeros where that index is -1: no state)."""
        if not self.draft_tokens:
            return
        state = torch.zeros(len(dest), 1, self.mtp_state.shape[-1], dtype=self.mtp_state.dtype, device=self.device)
        for i, j in enumerate(src.tolist()):
            if mtp is not None and last[j] >= 0:
                state[i, 0] = mtp[j, last[j]]
        self.mtp_state = self.mtp_state.index_copy(0, dest, state)

    def step(self, generator=None, want_logprobs: bool = False, top: int = 0) -> _Decoded:
        """The decode step: every row feeds its token at its position and samples the next one with its own
        parameters — or, when speculating, feeds its token and k drafts and keeps the accepted ones and one more.
        Returns per row its new tokens (1, or 1..k+1), their log-probs (float32, when asked) and the `top` most
        likely (log-probs, ids) (when asked), all on the device; without speculation, no host sync. generator: one
        torch.Generator for the whole batch, or a list with one per row (None = the global RNG)."""
        self._update()
        if self._sampler is None:
            self._sampler = Sampler(self.params, self.device)
            live = [o is not None for o in self.owner]
            self._advance = 1 if all(live) else torch.tensor(live, dtype=torch.long, device=self.device)
        self._use_adapters(self.adapters)
        if self.draft_tokens:
            return self._speculate(generator, want_logprobs, top)
        length = max(self.positions) + 1
        if self.graphs is not None:
            logits = self.graphs(self.tokens, self.slots, length)
        else:
            self.cache.decode(self.slots, length=length)
            logits = self.decode_forward(self.tokens[:, None], positions=self.slots[:, None], cache=self.cache)[:, -1]
        tokens, logprobs, top_logprobs = self._sampler(logits, generator, want_logprobs, top)
        self.tokens, self.slots = tokens, self.slots + self._advance
        self.positions = [p + (o is not None) for p, o in zip(self.positions, self.owner)]
        unsqueeze = lambda t: None if t is None else t[:, None]  # noqa: E731
        return _Decoded(tokens[:, None], torch.ones_like(tokens), unsqueeze(logprobs),
                        None if top_logprobs is None else tuple(map(unsqueeze, top_logprobs)))

    def _speculate(self, generator, want_logprobs: bool, top: int) -> _Decoded:
        """The decode step with MTP speculation (see docs/engine.md): draft k tokens per row, verify them in
        one forward of the main model, accept, and run the MTP module over the accepted positions."""
        k, model, cache = self.draft_tokens, self.model, self.cache
        length = max(self.positions) + 1
        drafts, draft_probs, state = [], [], self.mtp_state
        draft_logits = self._draft_logits if self._draft_logits is not None else model.mtp_head(0, state)[:, -1]
        for j in range(k):  # draft j + 1 continues from draft j, at the next position
            if j:
                cache.decode(self.slots + j - 1, length=length + j - 1)
                state, draft_logits = self.mtp_forward(state, drafts[-1][:, None], (self.slots + j - 1)[:, None],
                                                       cache)
                draft_logits = draft_logits[:, -1]
            token, probs = self._sampler.draft(draft_logits, generator)
            drafts.append(token)
            draft_probs.append(probs)
        drafts = torch.stack(drafts, dim=1)
        slots = self.slots[:, None] + torch.arange(k + 1, device=self.device)
        cache.decode(slots, length=length + k)
        logits, hidden = self.decode_forward(torch.cat((self.tokens[:, None], drafts), dim=1), positions=slots,
                                             cache=cache, all_logits=True, return_hidden=True)
        tokens, counts, logprobs, top_logprobs = self._sampler.verify(
            logits, drafts, None if draft_probs[0] is None else torch.stack(draft_probs, dim=1),
            generator, want_logprobs, top)
        # the MTP module at each verified position, with the token after it, and its draft logits; only the accepted
        # ones are kept (a row's later slots, in its layers and the main model's, are overwritten by its next step)
        mtp, mtp_logits = self.mtp_forward(hidden, tokens, slots, cache)
        last = (counts - 1)[:, None]
        self.mtp_state = mtp.gather(1, last[:, :, None].expand(-1, 1, mtp.shape[-1]))
        self._draft_logits = mtp_logits.gather(1, last[:, :, None].expand(-1, 1, mtp_logits.shape[-1]))[:, 0]
        self.tokens = tokens.gather(1, last)[:, 0]
        # a row that finished in `generate` but is still in the batch stops at the cache's end
        end = cache.max_len - 1 - k
        self.slots = (self.slots + counts * self._advance).clamp(max=end)
        self.positions = [min(p + c, end) if o is not None else p
                          for p, c, o in zip(self.positions, counts.tolist(), self.owner)]
        return _Decoded(tokens, counts, logprobs, top_logprobs)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows` (device, long), moved to the front in that order: the others leave the batch."""
        self._update()
        self.cache.select_rows(rows)
        self.tokens, self.slots, self.mtp_state = self.tokens[rows], self.slots[rows], self.mtp_state[rows]
        order = rows.tolist()
        self.owner = [self.owner[i] for i in order]
        self.params = [self.params[i] for i in order]
        self.adapters = [self.adapters[i] for i in order]
        self.positions = [self.positions[i] for i in order]
        self._sampler = None
        self._draft_logits = None

    def vacate(self, rows: list[int]) -> None:
        """Free `rows` for later admissions. Host bookkeeping only (no device work, so no model lock needed): the
        device tensors follow at the next admit or step."""
        for i in rows:
            self.owner[i], self.params[i], self.positions[i], self.adapters[i] = None, _FREE, 0, BASE
        while self.owner and self.owner[-1] is None:
            self.owner.pop(), self.params.pop(), self.positions.pop(), self.adapters.pop()
        self._vacated = self._vacated or bool(rows)

    def _update(self) -> None:
        """Bring the device tensors in line with `vacate`: drop the free rows at the end, park the others at 0."""
        if not self._vacated:
            return
        self._vacated, self._sampler, self._draft_logits = False, None, None
        self.tokens, self.slots = self.tokens[: self.size], self.slots[: self.size]
        self.mtp_state = self.mtp_state[: self.size]
        free = [i for i, o in enumerate(self.owner) if o is None]
        if free:
            index = torch.tensor(free, device=self.device)
            self.tokens, self.slots = self.tokens.index_fill(0, index, 0), self.slots.index_fill(0, index, 0)
