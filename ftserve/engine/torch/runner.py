"""The forward pass of a decoder-only model over a preallocated, per-row KV cache: decode and prefill together.

Each architecture (llama_runner.py, gpt2_runner.py) runs its own modules for everything but attention
(embeddings, norms, positions, projections, which carry the batched LoRA terms, MLP, head), so numerics
follow transformers; this module holds what they share. Attention reads a cache written in place::

    K, V per layer: (max_batch, kv_heads, columns, head_dim)

Row ``i`` of the running batch lives in cache row ``i`` and holds its tokens in columns ``0 .. len_i - 1``.
``columns`` starts at 256 and doubles (one copy) when a step needs more, up to ``max_len``, so memory
follows the longest sequence in flight. The worst case, ``max_batch x max_len`` positions, must fit in the
memory free when the engine starts, or the engine refuses to start, naming the settings to lower, rather
than being killed mid-request later.

One step is one forward over a list of pieces, each ``tokens`` of one row at positions ``start ..``: a decode
piece is one token; a prefill piece is a whole prompt or one chunk of a long one (chunked prefill). All
tokens of the step are flattened into one ``(T, hidden)`` activation, so every projection is one GEMM for
decodes and prefills alike (as in vLLM), and a request arriving while others decode costs no extra forward.
Each layer writes every token's K/V to its cache column, then attends in two groups:

* single tokens (the leading pieces of length 1): ``(n, heads, 1, d)`` against cache rows, masked to
  columns ``<= start``;
* longer pieces, right-padded to ``(m, heads, L, d)``: causally among themselves when they all start at
  position 0, else against cache rows, masked to columns ``<= start + j``.

Padding exists only inside attention; its outputs are dropped. Only the tokens whose logits a piece asks
for (its last, to sample; all, for prompt log probabilities) go through the output head. A finished row is
replaced by the last running row (one row copied), so rows stay ``0 .. n - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ServingError

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's MemAvailable; None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class Runner:
    """The KV cache and the step over pieces; a subclass runs one architecture's layers (``_forward``) and
    head (``_logits``)."""

    INITIAL_COLUMNS = 256

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, n_layers: int, n_heads: int, n_kv: int,
                 head_dim: int) -> None:
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.max_batch, self.max_len = max_batch, max_len
        weight = model.get_output_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        position_bytes = 2 * n_layers * n_kv * head_dim * self.dtype.itemsize
        worst, free = max_batch * max_len * position_bytes, available_memory(self.device)
        if free is not None and worst > free:
            raise ServingError(f"the KV cache for {max_batch} requests (max_num_seqs) of {max_len} tokens "
                               f"(max_model_len) can grow to {worst / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB "
                               f"of memory is free; lower one of them (each position of one request takes "
                               f"{position_bytes / 2**10:.0f} KiB)")
        self.columns = min(max_len, self.INITIAL_COLUMNS)
        self.k = [self._zeros() for _ in range(n_layers)]
        self.v = [self._zeros() for _ in range(n_layers)]

    def _zeros(self) -> Tensor:
        return torch.zeros(self.max_batch, self.n_kv, self.columns, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def reserve(self, columns: int) -> None:
        """Room for ``columns`` positions per row: the allocation doubles (one copy) when it is short."""
        if columns <= self.columns:
            return
        old = self.columns
        self.columns = min(self.max_len, max(columns, 2 * old))
        for cache in (self.k, self.v):
            for i, tensor in enumerate(cache):
                cache[i] = self._zeros()
                cache[i][:, :, :old] = tensor

    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def scaling(self, layer: int) -> float:
        """The factor on q.k in ``layer``'s attention."""
        raise NotImplementedError

    def _forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """Hidden states ``(T, hidden)`` of flattened tokens; ``attend(layer, q, k, v)`` with q ``(T, heads, d)``
        and k, v ``(T, kv_heads, d)`` (after any rotary embedding) returns ``(T, heads * d)``."""
        raise NotImplementedError

    def _logits(self, hidden: Tensor) -> Tensor:
        """Float logits ``(k, vocab)`` of final hidden states ``(k, hidden)``."""
        raise NotImplementedError

    def forward(self, pieces: list[Piece]) -> Tensor:
        """One step over ``pieces`` (single tokens first); next-token logits ``(k, vocab)``, piece by piece in
        order: none, the last token's, or every token's, as each piece asks."""
        self.reserve(max(p.start + len(p.tokens) for p in pieces))
        device, kv, columns = self.device, self.n_kv, self.columns
        ids = [t for p in pieces for t in p.tokens]
        positions = [p.start + j for p in pieces for j in range(len(p.tokens))]
        rows = [p.row for p in pieces for _ in p.tokens]
        singles = next((i for i, p in enumerate(pieces) if len(p.tokens) != 1), len(pieces))
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        # (row, head, pos) as a row index of the cache viewed as (max_batch * kv_heads * columns, head_dim):
        # index_copy_ is far cheaper than advanced-index assignment on CPU.
        heads = torch.arange(kv, device=device)
        where = ((torch.tensor(rows, device=device)[:, None] * kv + heads) * columns + pos[:, None]).reshape(-1)
        single = _SingleGroup(pieces[:singles], self) if singles else None
        multi = _MultiGroup(pieces[singles:], singles, self) if singles < len(pieces) else None

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.k[i].view(-1, self.head_dim).index_copy_(0, where, k.reshape(-1, self.head_dim))
            self.v[i].view(-1, self.head_dim).index_copy_(0, where, v.reshape(-1, self.head_dim))
            outs = [g.attend(i, q, k, v) for g in (single, multi) if g is not None]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = self._forward(torch.tensor(ids, dtype=torch.long, device=device), pos, attend)
        picked, offset = [], 0
        for p in pieces:
            offset += len(p.tokens)
            picked += range(offset - p.logit_rows, offset)
        if len(picked) < len(ids):
            hidden = hidden.index_select(0, torch.tensor(picked, dtype=torch.long, device=device))
        return self._logits(hidden)

    def rows(self, layer: int, rows: slice | Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Cache K, V of ``rows`` (see ``row_selector``) up to column ``span``."""
        k, v = self.k[layer][:, :, :span], self.v[layer][:, :, :span]
        if isinstance(rows, slice):
            return k[rows], v[rows]
        return k.index_select(0, rows), v.index_select(0, rows)

    def row_selector(self, rows: list[int]) -> slice | Tensor:
        """A slice (a view of the cache, no copy) when the rows are consecutive, else an index."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def move_row(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

@dataclass
class Piece:
    """Tokens of one cache row at positions ``start ..``; ``logits``: which tokens' next-token logits to
    return: "last" (to sample), "all" (prompt log probabilities too) or "none" (a chunk mid-prompt)."""

    row: int
    start: int
    tokens: list[int]
    logits: Literal["none", "last", "all"] = "last"

    @property
    def logit_rows(self) -> int:
        """Rows of logits this piece yields: none, its last token's, or all of its tokens'."""
        return {"none": 0, "last": 1}.get(self.logits, len(self.tokens))


class _SingleGroup:
    """The leading single-token pieces (decodes): ``(n, heads, 1, d)`` against their cache rows."""

    def __init__(self, pieces: list[Piece], runner: Runner) -> None:
        self.runner, self.n = runner, len(pieces)
        self.rows = runner.row_selector([p.row for p in pieces])
        starts = torch.tensor([p.start for p in pieces], device=runner.device)
        self.span = max(p.start for p in pieces) + 1
        self.mask = (torch.arange(self.span, device=runner.device) <= starts[:, None]).view(self.n, 1, 1, self.span)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = self.runner
        keys, values = r.rows(layer, self.rows, self.span)
        out = F.scaled_dot_product_attention(q[:self.n].unsqueeze(2), keys, values, attn_mask=self.mask,
                                             scale=r.scaling(layer), enable_gqa=r.n_kv != r.n_heads)
        return out.view(self.n, -1)


class _MultiGroup:
    """Pieces of several tokens (prefills), right-padded to ``(m, heads, L, d)``; they follow ``first`` single
    tokens in the flattened step."""

    def __init__(self, pieces: list[Piece], first: int, runner: Runner) -> None:
        self.runner, self.first, self.m = runner, first, len(pieces)
        lengths = [len(p.tokens) for p in pieces]
        self.length = L = max(lengths)
        self.tokens = sum(lengths)
        self.fresh = all(p.start == 0 for p in pieces)  # nothing cached yet: attend to the new K/V directly
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
        if not self.fresh:
            self.rows = runner.row_selector([p.row for p in pieces])
            starts = torch.tensor([p.start for p in pieces], device=device)
            self.span = max(p.start + n for p, n in zip(pieces, lengths))
            limit = starts[:, None] + torch.arange(L, device=device)
            self.mask = (torch.arange(self.span, device=device) <= limit[:, :, None]).unsqueeze(1)

    def _padded(self, x: Tensor) -> Tensor:
        x = x[self.first:self.first + self.tokens]
        if self.gather is not None:
            x = x.index_select(0, self.gather)
        return x.view(self.m, self.length, x.shape[-2], x.shape[-1]).transpose(1, 2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        r = self.runner
        gqa = r.n_kv != r.n_heads
        if self.fresh:
            out = F.scaled_dot_product_attention(self._padded(q), self._padded(k), self._padded(v), is_causal=True,
                                                 scale=r.scaling(layer), enable_gqa=gqa)
        else:
            keys, values = r.rows(layer, self.rows, self.span)
            out = F.scaled_dot_product_attention(self._padded(q), keys, values, attn_mask=self.mask,
                                                 scale=r.scaling(layer), enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(self.m * self.length, -1)
        return out if self.keep is None else out.index_select(0, self.keep)
