"""Preallocated per-layer key/value caches.

Full-attention layers get a linear cache indexed by absolute position. Sliding-window layers get a ring buffer
of ``sliding_window`` slots (slot = position % slots; the continuous-batching engine adds one prompt chunk's
worth, see :meth:`KVCache.begin`), so a long conversation pays full-context memory only on the full-attention
layers (1 in 6 on Gemma 3).

Every cache row also records the absolute position held in each slot (-1 when empty); attention masks are
built from those positions, which keeps one code path for prefill, chunked prefill and decode, and lets every
row of a batch sit at its own position. All caches of one size hold the same positions, so they share one
position table (:class:`Slots`), written once per forward by :meth:`KVCache.begin`; layers then share masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig, LayerSpec


@dataclass
class Slots:
    """Where each position goes in caches of one size, shared by all layers with that size."""

    pos: torch.Tensor  # (B, S + 1) int64: absolute position stored in each slot, -1 if none; last slot = trash
    ring: bool  # True for a sliding-window ring buffer
    index: torch.Tensor | None = None  # (B, T) slot of each new token in the current forward (S for padding)
    empty: bool = False  # the caches held no token before the current (multi-token) forward
    before: torch.Tensor | None = None  # (B, S) positions before the current forward (ring chunks only)
    rows: torch.Tensor | None = None  # (N,) cache row of each token of a ragged forward (None: batch row b -> b)

    @property
    def slots(self) -> int:
        return self.pos.shape[1] - 1

    def visible_prefix(self, positions: torch.Tensor) -> int:
        """How many leading slots can hold a token visible to queries at ``positions``: up to the furthest
        position (slot == position in a linear cache, and in a ring until it wraps), or every slot with the trash
        slot once the ring has wrapped. Decode kernels then read only the slots in use, not a whole 512-slot ring
        per row from the first token on."""
        end = int(positions.max()) + 1 if positions.numel() else 0
        return self.slots + 1 if self.ring and end > self.slots else end

    def begin(self, positions: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        S = self.slots
        T = positions.shape[1]
        valid = positions >= 0
        index = torch.where(valid, positions % S if self.ring else positions, torch.full_like(positions, S))
        self.rows = rows
        if rows is not None:  # ragged: one token per batch row, written to its sequence's cache row
            self.empty, self.before = False, None
            self.pos[rows, index[:, 0]] = torch.where(valid[:, 0], positions[:, 0], -1)
            self.pos[:, S] = -1
            self.index = index
            return
        if self.ring and T > S:
            # Only the last S tokens of a long chunk survive in the ring; the others go to the trash slot.
            index[:, : T - S] = S
        # Chunks attend over the old ring plus themselves, unless the ring is empty and the chunk fits in it.
        self.empty = not bool((self.pos >= 0).any()) if T > 1 else False
        self.before = self.pos[:, :-1].clone() if self.ring and T > 1 and not (self.empty and T <= S) else None
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
        self.pos[rows, index] = torch.where(valid, positions, torch.full_like(positions, -1))
        self.pos[:, S] = -1
        self.index = index


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, S + 1, n_kv, head_dim); the extra last slot swallows writes from padding tokens
    v: torch.Tensor  # (B, S + 1, n_kv, head_dim)
    slots: Slots

    @property
    def ring(self) -> bool:
        return self.slots.ring

    def update(
        self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values and return what the new queries must attend over.

        Args:
            k_new, v_new: (B, T, n_kv, head_dim) for the new tokens.
            positions: (B, T) absolute positions, -1 for padding (already placed by :meth:`KVCache.begin`).

        Returns:
            keys, values (B, K, n_kv, head_dim) and their positions (B, K).
        """
        s = self.slots
        if s.before is not None:
            # A chunk may overwrite ring slots its own earlier queries still need: attend over the old cache
            # plus the chunk, then keep only the newest tokens.
            keys = torch.cat([self.k[:, :-1], k_new], dim=1)
            values = torch.cat([self.v[:, :-1], v_new], dim=1)
            key_pos = torch.cat([s.before, positions], dim=1)
            self._write(k_new, v_new)
            return keys, values, key_pos
        self._write(k_new, v_new)
        return self.visible(positions)

    def visible(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions the queries at ``positions`` attend over, once their own are written."""
        end = self.slots.visible_prefix(positions)
        return self.k[:, :end], self.v[:, :end], self.slots.pos[:, :end]

    def _write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        index = self.slots.index
        if self.slots.rows is not None:  # ragged: token i goes to slot index[i] of cache row rows[i]
            self.k[self.slots.rows, index[:, 0]] = k_new[:, 0].to(self.k.dtype)
            self.v[self.slots.rows, index[:, 0]] = v_new[:, 0].to(self.v.dtype)
            return
        if index.shape[0] == 1 and index.shape[1] == 1:  # decode, one row: plain slicing is cheapest
            slot = int(index[0, 0])
            self.k[:, slot] = k_new[:, 0].to(self.k.dtype)
            self.v[:, slot] = v_new[:, 0].to(self.v.dtype)
            return
        rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
        self.k[rows, index] = k_new.to(self.k.dtype)
        self.v[rows, index] = v_new.to(self.v.dtype)


class KVCache:
    """One :class:`LayerCache` per decoder layer that owns keys and values, for ``batch_size`` rows of up to
    ``max_len`` tokens. Layers that read another layer's keys (Gemma 4 KV sharing) get None and no memory."""

    def __init__(
        self,
        config: GemmaConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ring_extra: int = 0,
    ) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.ring_extra = ring_extra
        self.rows: torch.Tensor | None = None  # set by begin() for a ragged forward
        self.layers: list[LayerCache | None] = []
        self._slots: dict[int, Slots] = {}
        for spec in config.layers:
            if spec.kv_source is not None:
                self.layers.append(None)
                continue
            n = _slots_for(config, spec, max_len, ring_extra)
            ring = n < max_len
            slots = self._slots.setdefault(
                n, Slots(torch.full((batch_size, n + 1), -1, dtype=torch.long, device=device), ring)
            )
            shape = (batch_size, n + 1, spec.num_key_value_heads, spec.head_dim)
            self.layers.append(
                LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device), slots)
            )

    @staticmethod
    def row_bytes(config: GemmaConfig, max_len: int, dtype: torch.dtype = torch.float32, ring_extra: int = 0) -> int:
        """Memory one row of a cache for ``max_len`` tokens takes (what admission control budgets)."""
        item = torch.empty(0, dtype=dtype).element_size()
        total = 0
        for spec in config.layers:
            if spec.kv_source is None:
                n = _slots_for(config, spec, max_len, ring_extra)
                total += 2 * (n + 1) * spec.num_key_value_heads * spec.head_dim * item + 8 * (n + 1)
        return total

    def begin(self, positions: torch.Tensor, rows: torch.Tensor | None = None) -> bool:
        """Place the positions of the tokens about to be run; called once per forward, before the layers.
        Returns True when every cache was empty before (a fresh prefill).

        ``rows`` (N,) makes the forward ragged: ``positions`` is (N, 1), one token per batch row, and token i
        belongs to the sequence in cache row ``rows[i]``. Several tokens may share a row (consecutive prompt
        tokens of one sequence): all are written before any attends, and each sees the positions up to its own.
        A ring must then hold ``sliding_window`` plus as many slots as one row adds per forward (``ring_extra``),
        or a token would overwrite keys that an earlier token of the same forward still needs.
        """
        self.rows = rows
        for slots in self._slots.values():
            slots.begin(positions, rows)
        return all(slots.empty for slots in self._slots.values())

    def takes_ragged(self, tokens: int) -> bool:
        """Whether a ragged forward may add ``tokens`` tokens to one row (its rings have the spare slots; see
        :meth:`begin`)."""
        return tokens <= self.ring_extra or not any(s.ring for s in self._slots.values())

    def narrow(self, start: int, length: int) -> "KVCache":
        """A cache over rows [start, start + length) that shares this one's memory (writes go through): the
        engine prefills one sequence in its own row, and decodes the prefix of rows that hold sequences."""
        view = KVCache.__new__(KVCache)
        view.batch_size, view.max_len, view.rows, view.ring_extra = length, self.max_len, None, self.ring_extra
        slots = {n: Slots(s.pos[start : start + length], s.ring) for n, s in self._slots.items()}
        view._slots = slots
        view.layers = [
            None if c is None else LayerCache(c.k[start : start + length], c.v[start : start + length],
                                              slots[c.slots.slots])
            for c in self.layers
        ]
        return view

    def keep_prefix(self, row: int, length: int) -> None:
        """Forget row ``row``'s tokens from position ``length`` on, keeping those before (a reused prefix)."""
        for slots in self._slots.values():
            held = slots.pos[row]
            held[held >= length] = -1

    def copy_row(self, src: int, dst: slice) -> None:
        """Make rows ``dst`` hold what row ``src`` holds (keys, values, positions): sequences that share a prefix
        prefill it once (the model guard's policies)."""
        for c in self.layers:
            if c is not None:
                c.k[dst] = c.k[src]
                c.v[dst] = c.v[src]
        for slots in self._slots.values():
            slots.pos[dst] = slots.pos[src]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the cached tokens of some rows (all rows if None); the memory stays allocated."""
        for slots in self._slots.values():
            if rows is None:
                slots.pos.fill_(-1)
            else:
                slots.pos[rows] = -1

    @property
    def nbytes(self) -> int:
        kv = sum(c.k.nbytes + c.v.nbytes for c in self.layers if c is not None)
        return kv + sum(s.pos.nbytes for s in self._slots.values())


def _slots_for(config: GemmaConfig, spec: LayerSpec, max_len: int, ring_extra: int) -> int:
    """Slots of one layer's cache: a ring of the sliding window (plus ``ring_extra``) where that is shorter than
    the context, else one slot per position."""
    if spec.sliding and config.sliding_window + ring_extra < max_len:
        return config.sliding_window + ring_extra
    return max_len
