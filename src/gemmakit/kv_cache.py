"""Preallocated per-layer key/value caches.

Full-attention layers get a linear cache indexed by absolute position. Sliding-window layers get a ring buffer
of exactly ``sliding_window`` slots (slot = position % window), so a long conversation pays full-context
memory only on the full-attention layers (1 in 6 on Gemma 3).

Every cache row also records the absolute position held in each slot (-1 when empty); attention masks are
built from those positions, which keeps one code path for prefill, chunked prefill and decode, and lets every
row of a batch sit at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, S + 1, n_kv, head_dim); the extra last slot swallows writes from padding tokens
    v: torch.Tensor  # (B, S + 1, n_kv, head_dim)
    pos: torch.Tensor  # (B, S + 1) int64: absolute position stored in each slot, -1 if none
    ring: bool  # True for a sliding-window ring buffer

    @property
    def slots(self) -> int:
        return self.k.shape[1] - 1

    def update(
        self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values and return what the new queries must attend over.

        Args:
            k_new, v_new: (B, T, n_kv, head_dim) for the new tokens.
            positions: (B, T) absolute positions, -1 for padding.

        Returns:
            keys, values (B, K, n_kv, head_dim) and their positions (B, K).
        """
        T = positions.shape[1]
        if self.ring and T > 1:
            # A chunk may overwrite ring slots its own earlier queries still need: attend over the old cache
            # plus the chunk, then keep only the newest `slots` tokens.
            keys = torch.cat([self.k[:, :-1], k_new], dim=1)
            values = torch.cat([self.v[:, :-1], v_new], dim=1)
            key_pos = torch.cat([self.pos[:, :-1], positions], dim=1)
            self._write(k_new, v_new, positions)
            return keys, values, key_pos
        self._write(k_new, v_new, positions)
        if self.ring:
            return self.k, self.v, self.pos
        # Linear cache: slot == position, so only the prefix up to the furthest position can be visible.
        end = int(positions.max()) + 1 if positions.numel() else 0
        return self.k[:, :end], self.v[:, :end], self.pos[:, :end]

    def _write(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        S = self.slots
        if self.ring and positions.shape[1] > S:
            # Only the last S tokens of a long chunk survive in the ring.
            k_new, v_new, positions = k_new[:, -S:], v_new[:, -S:], positions[:, -S:]
        valid = positions >= 0
        slot = torch.where(valid, positions % S if self.ring else positions, torch.full_like(positions, S))
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)
        self.k[rows, slot] = k_new.to(self.k.dtype)
        self.v[rows, slot] = v_new.to(self.v.dtype)
        self.pos[rows, slot] = torch.where(valid, positions, torch.full_like(positions, -1))
        self.pos[:, S] = -1

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the cached tokens of some rows (all rows if None); the memory stays allocated."""
        if rows is None:
            self.pos.fill_(-1)
        else:
            self.pos[rows] = -1


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
    ) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.layers: list[LayerCache | None] = []
        for spec in config.layers:
            if spec.kv_source is not None:
                self.layers.append(None)
                continue
            ring = spec.sliding and config.sliding_window < max_len
            slots = config.sliding_window if ring else max_len
            shape = (batch_size, slots + 1, spec.num_key_value_heads, spec.head_dim)
            self.layers.append(
                LayerCache(
                    k=torch.zeros(shape, dtype=dtype, device=device),
                    v=torch.zeros(shape, dtype=dtype, device=device),
                    pos=torch.full((batch_size, slots + 1), -1, dtype=torch.long, device=device),
                    ring=ring,
                )
            )

    def reset(self, rows: torch.Tensor | None = None) -> None:
        for layer in self.layers:
            if layer is not None:
                layer.reset(rows)

    @property
    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes + c.pos.nbytes for c in self.layers if c is not None)
