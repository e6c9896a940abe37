"""Many adapters' LoRA factors in preallocated slots, applied to a batch of mixed adapters in one pass.

The idea of Punica (arXiv:2310.18547) and S-LoRA (arXiv:2311.03285): the base weight is shared, so one GEMM
serves every row, and each row ``i`` adds its own adapter's low-rank term::

    y_i = W x_i + B_{a(i)} (A_{a(i)} x_i)          (the scale s folded into B when a slot is written)

Every target module keeps two stacked tensors, allocated once on first use::

    A  (max_loras, max_rank, d_in)          rows past an adapter's rank are zero
    Bt (max_loras, max_rank, d_out)         (s B)^T

A batch's rows are grouped by slot and laid out as ``(chunks, m, d_in)`` (a group larger than ``m`` rows is
cut into several chunks of m, so the padded layout never exceeds ``2 N + G`` rows for N rows in G groups),
then the whole term is two ``torch.bmm`` between two row gathers:

    x ──gather──► (C, m, d_in) ──bmm A^T──► (C, m, r) ──bmm Bt──► (C, m, d_out) ──gather, add──► y

``r`` is the largest rank among the batch's adapters on that module, not ``max_rank``. Rows of the base model
are simply not in any chunk. Weights are never folded, so any mix of adapters runs in the same forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...methods.base import TARGETABLE, linear_shape


class LoraBatch:
    """Which rows of a flattened ``(rows, d)`` activation use which slot, laid out for ``torch.bmm``.

    ``segments``: ``(slot, first_row, n_rows)`` triples; rows of the base model are left out. ``gather`` picks
    the padded layout's rows from the activation; ``scatter`` picks each activation row's result back from
    the layout's output, whose extra last row is zero (rows of the base model). Both are gathers:
    ``index_add_`` would do the same but is orders of magnitude slower on CPU.
    """

    def __init__(self, segments: list[tuple[int, int, int]], rows: int, device: torch.device | str = "cpu") -> None:
        groups: dict[int, list[int]] = {}
        for slot, start, count in segments:
            groups.setdefault(slot, []).extend(range(start, start + count))
        self.slots = frozenset(groups)
        self.empty = not groups
        if self.empty:
            return
        adapted = sum(len(g) for g in groups.values())
        self.m = m = max(1, math.ceil(adapted / len(groups)))
        chunk_slots: list[int] = []
        gather: list[int] = []
        valid: list[float] = []
        for slot, members in sorted(groups.items()):
            for i in range(0, len(members), m):
                part = members[i:i + m]
                chunk_slots.append(slot)
                gather += part + [part[0]] * (m - len(part))
                valid += [1.0] * len(part) + [0.0] * (m - len(part))
        self.chunks = len(chunk_slots)
        self.identity = gather == list(range(rows))  # every row, in order, no padding: no gathers at all
        scatter = [len(gather)] * rows
        for position, (row, ok) in enumerate(zip(gather, valid)):
            if ok:
                scatter[row] = position
        self.scatter = torch.tensor(scatter, dtype=torch.long, device=device)
        lo = chunk_slots[0]
        # Slots taken in order and once each: a view of the stacked tensors, no copy of the factors.
        self.slot_range = (lo, lo + self.chunks) if chunk_slots == list(range(lo, lo + self.chunks)) else None
        self.slot_index = torch.tensor(chunk_slots, dtype=torch.long, device=device)
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.padded = 0.0 in valid
        self.valid = torch.tensor(valid, device=device).view(self.chunks, m, 1) if self.padded else None

    @classmethod
    def for_rows(cls, row_slots: list[int | None], device: torch.device | str = "cpu") -> "LoraBatch":
        """One row per entry (decode): the slot of each row, None for the base model."""
        return cls([(s, i, 1) for i, s in enumerate(row_slots) if s is not None], len(row_slots), device)


class LoraContext:
    """The batch layout of the forward pass in progress, shared by every BatchedLoraLinear of a model."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None


class BatchedLoraLinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus the LoRA terms of up to ``max_loras`` adapters, one slot each."""

    def __init__(self, base_layer: nn.Module, context: LoraContext, max_loras: int, max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.out_features, self.in_features = linear_shape(base_layer)
        self.max_loras, self.max_rank = max_loras, max_rank
        self.ranks = [0] * max_loras  # rows of A/Bt that are nonzero, per slot
        self.A: Tensor | None = None
        self.Bt: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        batch = self.context.batch
        if batch is None or batch.empty or self.A is None:
            return out
        r = max(self.ranks[s] for s in batch.slots)
        if r == 0:
            return out
        if batch.slot_range is not None:
            A = self.A[batch.slot_range[0]:batch.slot_range[1], :r]
            Bt = self.Bt[batch.slot_range[0]:batch.slot_range[1], :r]
        else:
            A = self.A[:, :r].index_select(0, batch.slot_index)
            Bt = self.Bt[:, :r].index_select(0, batch.slot_index)
        flat = x.reshape(-1, self.in_features)
        if batch.identity:
            h = torch.bmm(flat.view(batch.chunks, batch.m, self.in_features), A.transpose(1, 2))
            return out.add_(torch.bmm(h, Bt).view(out.shape))
        xs = flat.index_select(0, batch.gather).view(batch.chunks, batch.m, self.in_features)
        h = torch.bmm(xs, A.transpose(1, 2))
        if batch.valid is not None:
            h = h * batch.valid  # padding rows contribute exactly zero
        y = out.new_empty(batch.chunks * batch.m + 1, self.out_features)
        y[-1].zero_()
        torch.bmm(h, Bt, out=y[:-1].view(batch.chunks, batch.m, self.out_features))
        return out.add_(y.index_select(0, batch.scatter).view(out.shape))

    @torch.no_grad()
    def write(self, slot: int, A: Tensor | None, B: Tensor | None, scale: float = 1.0) -> None:
        """Put one adapter's factors ``A (r, d_in)``, ``B (d_out, r)`` into ``slot``; None clears the slot."""
        old = self.ranks[slot]
        if A is None:
            if old:
                self.A[slot, :old].zero_()
                self.Bt[slot, :old].zero_()
                self.ranks[slot] = 0
            return
        if self.A is None:
            weight = self.base_layer.weight
            kw = {"device": weight.device, "dtype": weight.dtype}
            self.A = torch.zeros(self.max_loras, self.max_rank, self.in_features, **kw)
            self.Bt = torch.zeros(self.max_loras, self.max_rank, self.out_features, **kw)
        r = A.shape[0]
        self.A[slot, :r].copy_(A)
        self.Bt[slot, :r].copy_((B.float() * scale).T)
        if old > r:
            self.A[slot, r:old].zero_()
            self.Bt[slot, r:old].zero_()
        self.ranks[slot] = r

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}")


class LoraSlots:
    """Every linear layer of a model wrapped in a BatchedLoraLinear; writes adapters into slots.

    ``exclude`` names modules never adapted (the output embedding). Slot tensors of a module are allocated
    when the first adapter that targets it is written, so memory follows what is served.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, exclude: tuple[nn.Module, ...] = ()) -> None:
        self.context = LoraContext()
        self.max_loras, self.max_rank = max_loras, max_rank
        self.layers: dict[str, BatchedLoraLinear] = {}
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, TARGETABLE) and not any(m is e for e in exclude)]
        for name, module in targets:
            layer = BatchedLoraLinear(module, self.context, max_loras, max_rank)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[name] = layer

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adaptable module, by name."""
        return {name: (layer.out_features, layer.in_features) for name, layer in self.layers.items()}

    def write(self, slot: int, factors: dict[str, tuple[Tensor, Tensor, float]]) -> None:
        """Fill ``slot`` with an adapter's ``(A, B, scale)`` per module; every other module's slot is cleared."""
        for name, layer in self.layers.items():
            layer.write(slot, *factors.get(name, (None, None)))

    def clear(self, slot: int) -> None:
        self.write(slot, {})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.A, layer.Bt) if t is not None)
