"""The tensors of continuous batching: the batch's KV cache with one P-tuning prefix per row, its masks, and
the forward. Knows request ids, adapters and token ids; nothing of HTTP, text or sampling.

Cache layout, per layer [rows, groups, slots + real, kv_channels]:

    | prefix block (slots)           | real tokens (left-padded)         |
    | row 0:  . . P P P P            | . . t t t t t t                   |
    | row 1:  P P P P P P            | t t t t t t t t                   |
    | row 2:  . . . . . .  (base)    | . . . . t t t t                   |

Each row's prefix is right-aligned in the shared block and the unused slots are masked for that row
(`prefix_mask`); real tokens are left-padded (`real_mask`) and keep position ids counted from 0 per
row. Prefix keys carry no rotary embedding, so where a prefix sits in the block does not matter.
Masked slots get weight exp(finfo.min) = 0 in softmax: a row's logits do not depend on its neighbours
beyond float rounding, and its greedy tokens equal decoding it alone (tested).

Prompts enter in two ways. Short prompts are prefilled together in one forward (`prefill`), a batch of
the same layout that `merge` joins to the running one. A long prompt, or one whose start is in the
prefix cache, is prefilled alone in chunks (`prefill_chunk`) in a one-row cache of the same layout, so
that running rows decode between its chunks; it joins when its last chunk is done.

`PrefixCache` keeps the keys/values of recent prompts' real tokens per adapter (each adapter's prefix
changes every key and value after it), and a prompt that starts the same way reuses the longest match.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmtune.compat import cache_tensors, new_dynamic_cache


@dataclass
class Batch:
    """Rows with their cache and masks, in one layout (the running batch, or new rows about to join it)."""

    ids: list[int]  # request ids, one per row
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    prefix_mask: torch.Tensor  # [rows, slots] bool
    real_mask: torch.Tensor  # [rows, real] long
    # The cache object holding `layers`, kept between steps: building one copies every tensor (transformers'
    # DynamicLayer concatenates onto an empty tensor), so it is rebuilt only when `layers` is replaced.
    cache: object = None

    def set_layers(self, layers) -> None:
        self.layers, self.cache = layers, None


class PrefixCache:
    """Recent prompts' real-token keys/values, by adapter; least recently used dropped past `max_tokens`."""

    def __init__(self, max_tokens: int = 16384, min_tokens: int = 32):
        self.max_tokens, self.min_tokens = max_tokens, max(1, min_tokens)
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], list] = OrderedDict()
        self._tokens = 0
        self.hits = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, ids: list[int]) -> tuple[int, list | None]:
        """(tokens reusable, their per-layer (keys, values)) for the longest stored start of `ids`.

        At most len(ids) - 1: the last prompt token is always computed, its logits give the first token."""
        best, found = 0, None
        for (name, stored), layers in self._entries.items():
            if name != adapter:
                continue
            n = len(os.path.commonprefix([stored, tuple(ids)]))
            if n > best:
                best, found = n, (name, stored)
        best = min(best, len(ids) - 1)
        if found is None or best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(found)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[found]]

    def add(self, adapter: str, ids: list[int], layers) -> None:
        """Keep a prompt's real-token keys/values (copies: the batch cache they come from changes)."""
        if self.max_tokens <= 0 or len(ids) < self.min_tokens or len(ids) > self.max_tokens:
            return
        key = (adapter, tuple(ids))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = [(k.clone(), v.clone()) for k, v in layers]
        self._tokens += len(ids)
        while self._tokens > self.max_tokens:
            (_, old), _ = self._entries.popitem(last=False)
            self._tokens -= len(old)


class _Chunked:
    """A prompt being prefilled alone, chunk by chunk."""

    def __init__(self, batch: Batch, done: int):
        self.batch, self.done = batch, done


class Runner:
    """Owns the model's batch state on the model's thread. `adapters` maps a served id to its `Adapter`."""

    def __init__(self, model, adapters: dict, prefix_cache: PrefixCache | None = None):
        self.model, self.adapters = model, adapters
        self.device, self.dtype = model.device, model.compute_dtype
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.batch: Batch | None = None
        self._chunked: dict[int, _Chunked] = {}

    @property
    def rows(self) -> list[int]:
        return list(self.batch.ids) if self.batch is not None else []

    def reset(self) -> None:
        """Forget the running batch (after a failed forward its cache may be half-updated)."""
        self.batch = None

    # --- building a batch ---

    def _empty(self, rids: list[int], adapters, width: int) -> tuple[Batch, int]:
        """New rows' prefix block in a fresh layout (real tokens not yet in); (batch, slots)."""
        n, slots = len(rids), max(a.pre_seq_len for a in adapters)
        prefix_mask = torch.zeros(n, slots, dtype=torch.bool, device=self.device)
        config = self.model.config
        shape = (n, config.num_key_value_heads, slots, config.head_dim)
        layers = []
        for layer in range(config.num_hidden_layers):
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros_like(keys)
            for j, adapter in enumerate(adapters):
                if adapter.kv is not None:
                    keys[j, :, slots - adapter.pre_seq_len:] = adapter.kv[layer][0][0]
                    values[j, :, slots - adapter.pre_seq_len:] = adapter.kv[layer][1][0]
            layers.append((keys, values))
        for j, adapter in enumerate(adapters):
            prefix_mask[j, slots - adapter.pre_seq_len:] = True
        real_mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        return Batch(list(rids), layers, prefix_mask, real_mask), slots

    def _forward(self, batch: Batch, ids: torch.Tensor, real_mask: torch.Tensor):
        """Run `ids` [rows, q] after what `batch` holds; the batch takes the grown cache and mask."""
        cache = batch.cache
        if cache is None:
            cache = new_dynamic_cache(layers=batch.layers) if batch.layers[0][0].shape[2] else new_dynamic_cache(self.model.config)
        batch.cache = None  # a failed forward may have grown some layers of it
        out = self.model(input_ids=ids, attention_mask=real_mask, cache=cache, use_cache=True,
                         prefix_mask=batch.prefix_mask, logits_to_keep=1)
        batch.layers, batch.real_mask, batch.cache = cache_tensors(out.cache), real_mask, out.cache
        return out.logits[:, -1]

    def prefill(self, items: list[tuple[int, str, list[int]]]) -> tuple[Batch, torch.Tensor]:
        """One forward over whole prompts (left-padded), each after its own prefix: (new rows, last logits).

        A request alone is exactly what `glmtune chat` computes (no padding); together, rows differ from
        alone only by rounding. The rows join the running batch with `merge`.
        """
        rids = [rid for rid, _, _ in items]
        adapters = [self.adapters[name] for _, name, _ in items]
        width = max(len(ids) for _, _, ids in items)
        batch, _ = self._empty(rids, adapters, 0)
        real_mask = torch.zeros(len(items), width, dtype=torch.long, device=self.device)
        ids = torch.zeros(len(items), width, dtype=torch.long, device=self.device)  # 0 under the mask: any id
        for j, (_, _, prompt) in enumerate(items):
            real_mask[j, width - len(prompt):] = 1
            ids[j, width - len(prompt):] = torch.tensor(prompt, device=self.device)
        logits = self._forward(batch, ids, real_mask)
        slots = batch.prefix_mask.shape[1]
        for j, (_, name, prompt) in enumerate(items):
            start = slots + width - len(prompt)
            self.prefix_cache.add(name, prompt, [(k[j:j + 1, :, start:], v[j:j + 1, :, start:]) for k, v in batch.layers])
        return batch, logits

    def prefill_chunk(self, rid: int, adapter: str, prompt: list[int], end: int) -> tuple[Batch, torch.Tensor] | None:
        """Prefill `prompt` alone up to token `end` (starting from a cached start when there is one).

        None while tokens remain; (the one-row batch, its last logits) once `end` is the prompt's length."""
        state = self._chunked.get(rid)
        if state is None:
            batch, _ = self._empty([rid], [self.adapters[adapter]], 0)
            reused, kv = self.prefix_cache.lookup(adapter, prompt)
            if kv is not None:
                batch.set_layers([(torch.cat([k, ck], 2), torch.cat([v, cv], 2)) for (k, v), (ck, cv) in zip(batch.layers, kv)])
                batch.real_mask = torch.ones(1, reused, dtype=torch.long, device=self.device)
                self.prefix_cache.hits += 1
                self.prefix_cache.reused_tokens += reused
            state = self._chunked[rid] = _Chunked(batch, reused)
        end = max(end, state.done + 1)
        ids = torch.tensor([prompt[state.done:end]], dtype=torch.long, device=self.device)
        real_mask = torch.ones(1, end, dtype=torch.long, device=self.device)
        logits = self._forward(state.batch, ids, real_mask)
        state.done = end
        if end < len(prompt):
            return None
        del self._chunked[rid]
        slots = state.batch.prefix_mask.shape[1]
        self.prefix_cache.add(adapter, prompt, [(k[:, :, slots:], v[:, :, slots:]) for k, v in state.batch.layers])
        return state.batch, logits

    def chunked_done(self, rid: int) -> int:
        """Prompt tokens of a chunked prefill already in its cache (including a reused start); 0 if none."""
        state = self._chunked.get(rid)
        return state.done if state is not None else 0

    def cached_tokens(self, adapter: str, prompt: list[int]) -> int:
        """How much of `prompt` the prefix cache would give (without counting it as used)."""
        if self.prefix_cache.max_tokens <= 0:
            return 0
        hits, reused = self.prefix_cache.hits, self.prefix_cache.reused_tokens
        n, _ = self.prefix_cache.lookup(adapter, prompt)
        self.prefix_cache.hits, self.prefix_cache.reused_tokens = hits, reused
        return n

    def drop_chunked(self, rid: int) -> None:
        self._chunked.pop(rid, None)

    # --- the running batch ---

    def merge(self, new: Batch) -> None:
        """Add prefilled rows to the batch, widening the prefix block and the real block as needed.

        Builds the new state first and assigns it last: if anything raises, the running batch is unchanged."""
        old = self.batch
        if old is None:
            self.batch = new
            return
        old_slots, old_real = old.prefix_mask.shape[1], old.real_mask.shape[1]
        add_slots, add_real = new.prefix_mask.shape[1], new.real_mask.shape[1]
        new_slots, new_real = max(old_slots, add_slots), max(old_real, add_real)

        def widen(t: torch.Tensor, have_slots: int, have_real: int) -> torch.Tensor:
            pre, real = t[:, :, :have_slots], t[:, :, have_slots:]
            return torch.cat([F.pad(pre, (0, 0, new_slots - have_slots, 0)),
                              F.pad(real, (0, 0, new_real - have_real, 0))], dim=2)

        layers = [tuple(torch.cat([widen(a, old_slots, old_real), widen(b, add_slots, add_real)], dim=0)
                        for a, b in ((ok, nk), (ov, nv)))
                  for (ok, ov), (nk, nv) in zip(old.layers, new.layers)]
        prefix_mask = torch.cat([F.pad(old.prefix_mask, (new_slots - old_slots, 0)),
                                 F.pad(new.prefix_mask, (new_slots - add_slots, 0))])
        real_mask = torch.cat([F.pad(old.real_mask, (new_real - old_real, 0)),
                               F.pad(new.real_mask, (new_real - add_real, 0))])
        self.batch = Batch(old.ids + new.ids, layers, prefix_mask, real_mask)

    def decode(self, tokens: dict[int, int]) -> tuple[list[int], torch.Tensor]:
        """One step for every row: feed each row's last token (`tokens` by request id); (row ids, logits)."""
        batch = self.batch
        ids = torch.tensor([[tokens[rid]] for rid in batch.ids], dtype=torch.long, device=self.device)
        mask = torch.cat([batch.real_mask, batch.real_mask.new_ones(len(batch.ids), 1)], dim=1)
        try:
            return list(batch.ids), self._forward(batch, ids, mask)
        except Exception:
            self.batch = None  # the cache may be half-grown
            raise

    def remove(self, rids) -> None:
        """Drop rows (finished, cancelled, failed); drop cache columns no remaining row uses."""
        batch, gone = self.batch, set(rids)
        for rid in gone:
            self.drop_chunked(rid)
        if batch is None or not gone.intersection(batch.ids):
            return
        keep = [i for i, rid in enumerate(batch.ids) if rid not in gone]
        if not keep:
            self.batch = None
            return
        index = torch.tensor(keep, device=self.device)
        prefix_used = batch.prefix_mask[index].any(0)
        real_used = batch.real_mask[index].bool().any(0)
        columns = torch.cat([prefix_used, real_used]).nonzero().squeeze(1)
        self.batch = Batch([batch.ids[i] for i in keep],
                           [(k[index][:, :, columns], v[index][:, :, columns]) for k, v in batch.layers],
                           batch.prefix_mask[index][:, prefix_used], batch.real_mask[index][:, real_used])
