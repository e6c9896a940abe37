"""Attention over the paged KV cache, for the pieces of one step (runner.py), in groups of consecutive pieces.

The cache of a layer is ``(kv_heads, slots, head_dim)`` (kv_blocks.py maps positions to slots). Each group is
one ``scaled_dot_product_attention`` per layer, after the step's K/V are written to their slots:

* ``HomeDecodes``: single tokens of sequences whose blocks are all in their home row. Rows are
  ``row_blocks * BLOCK_SIZE`` slots apart, so rows ``lo .. hi`` are one strided view ``(rows, kv_heads, span, d)`` of
  the cache, with each head's positions contiguous: the decode batch reads its keys in place, with no copy,
  as a per-row cache would. Rows of the range that are not in the step get a dummy query, dropped after.
* ``FreshPrompts``: prompts with nothing cached (every piece starts at 0), right-padded to
  ``(m, heads, L, d)`` and attending causally to their own new K/V.
* ``Gathered``: everything else (a prompt chunk after cached tokens or a cached prefix, a decode outside its
  home row): keys and values gathered through the block tables into ``(m, kv_heads, span, d)``, masked to
  columns ``<= start + j``.

Padding exists only inside attention; its outputs are dropped. This module is the one place attention reads
the cache: a fused paged-attention kernel (vLLM's ``paged_attention_v1`` on CUDA, reading block tables in the
kernel) would stand here beside ``Gathered`` behind the same ``attend(layer, q, k, v)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_blocks import BLOCK_SIZE, blocks_for


def attention_groups(pieces: list, runner: Any) -> list:
    """Consecutive runs of ``pieces`` of one kind, each as its group, in the step's token order."""
    groups, first, i = [], 0, 0
    while i < len(pieces):
        kind = _kind(pieces[i])
        j = i
        while j < len(pieces) and _kind(pieces[j]) is kind:
            j += 1
        groups.append(kind(pieces[i:j], first, runner))
        first += sum(len(p.tokens) for p in pieces[i:j])
        i = j
    return groups


def _kind(piece) -> type:
    if len(piece.tokens) == 1 and piece.home is not None:
        return HomeDecodes
    return FreshPrompts if piece.start == 0 else Gathered


class _Group:
    """Pieces whose tokens are ``first .. first + tokens - 1`` of the step, right-padded to length ``L``."""

    def __init__(self, pieces: list, first: int, runner: Any) -> None:
        self.runner, self.first, self.m = runner, first, len(pieces)
        lengths = [len(p.tokens) for p in pieces]
        self.length = L = max(lengths)
        self.tokens = sum(lengths)
        self.gqa = runner.n_kv != runner.n_heads
        device = runner.device
        if self.tokens == self.m * L:  # equal lengths: the padded layout is a view
            self.gather = self.keep = None
        else:  # padding repeats a piece's last token, so no position of the layout holds garbage
            offsets = [0]
            for n in lengths[:-1]:
                offsets.append(offsets[-1] + n)
            self.gather = torch.tensor([o + min(j, n - 1) for o, n in zip(offsets, lengths) for j in range(L)],
                                       device=device)
            self.keep = torch.tensor([b * L + j for b, n in enumerate(lengths) for j in range(n)], device=device)

    def _padded(self, x: Tensor) -> Tensor:
        x = x[self.first:self.first + self.tokens]
        if self.gather is not None:
            x = x.index_select(0, self.gather)
        return x.view(self.m, self.length, x.shape[-2], x.shape[-1]).transpose(1, 2)

    def _unpadded(self, out: Tensor) -> Tensor:
        out = out.transpose(1, 2).reshape(self.m * self.length, -1)
        return out if self.keep is None else out.index_select(0, self.keep)


class FreshPrompts(_Group):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(self._padded(q), self._padded(k), self._padded(v), is_causal=True,
                                             scale=self.runner.scaling(layer), enable_gqa=self.gqa)
        return self._unpadded(out)


class Gathered(_Group):
    def __init__(self, pieces: list, first: int, runner: Any) -> None:
        super().__init__(pieces, first, runner)
        device = runner.device
        self.span = span = max(p.start + len(p.tokens) for p in pieces)
        width = blocks_for(span)
        tables = [p.blocks[:width] + [p.blocks[-1]] * (width - len(p.blocks[:width])) for p in pieces]
        table = torch.tensor(tables, dtype=torch.long, device=device)
        slots = (table[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=device)).view(self.m, -1)
        self.slots = slots[:, :span].reshape(-1)
        starts = torch.tensor([p.start for p in pieces], device=device)
        limit = starts[:, None] + torch.arange(self.length, device=device)
        self.mask = (torch.arange(span, device=device) <= limit[:, :, None]).unsqueeze(1)

    def _cached(self, cache: Tensor) -> Tensor:
        return cache.index_select(1, self.slots).view(cache.shape[0], self.m, self.span, -1).transpose(0, 1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = self.runner
        out = F.scaled_dot_product_attention(self._padded(q), self._cached(r.k[layer]), self._cached(r.v[layer]),
                                             attn_mask=self.mask, scale=r.scaling(layer), enable_gqa=self.gqa)
        return self._unpadded(out)


class HomeDecodes:
    def __init__(self, pieces: list, first: int, runner: Any) -> None:
        self.runner, self.first, self.n = runner, first, len(pieces)
        device = runner.device
        homes = [p.home for p in pieces]
        self.lo, hi = min(homes), max(homes)
        self.count = hi - self.lo + 1
        self.span = max(p.start for p in pieces) + 1
        self.identity = homes == list(range(self.lo, hi + 1))
        starts = [0] * self.count  # a row of the range not in the step attends to its column 0, and is dropped
        for p in pieces:
            starts[p.home - self.lo] = p.start
        self.place = None if self.identity else torch.tensor([h - self.lo for h in homes], device=device)
        limit = torch.tensor(starts, device=device)
        self.mask = (torch.arange(self.span, device=device) <= limit[:, None]).view(self.count, 1, 1, self.span)
        self.gqa = runner.n_kv != runner.n_heads

    def _rows(self, cache: Tensor) -> Tensor:
        r = self.runner
        width = r.row_blocks * BLOCK_SIZE
        grid = cache[:, :r.rows * width].view(cache.shape[0], r.rows, width, cache.shape[-1])
        return grid[:, self.lo:self.lo + self.count, :self.span].transpose(0, 1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = self.runner
        q = q[self.first:self.first + self.n]
        if self.place is not None:
            q = q.new_zeros(self.count, *q.shape[1:]).index_copy_(0, self.place, q)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), self._rows(r.k[layer]), self._rows(r.v[layer]),
                                             attn_mask=self.mask, scale=r.scaling(layer), enable_gqa=self.gqa)
        out = out.view(self.count, -1)
        return out if self.place is None else out.index_select(0, self.place)
