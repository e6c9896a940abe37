"""The batched LoRA term of a mixed-adapter batch: its row layout and the kernel that computes it.

For the rows of one forward pass, each row ``i`` reading slot ``a(i)`` (or none: the base model)::

    delta_i = B_{a(i)} (A_{a(i)} x_i)          (the scale s folded into B when a slot is written)

and, for a slot holding a row-scaled adapter (methods/factors.py's LoraFactors: DoRA's form), its rows' whole
output is rescaled per output feature, the bias excepted::

    y_i = r_{a(i)} * (W x_i + delta_i) + bias = r_{a(i)} * out_i + (1 - r_{a(i)}) * bias + r_{a(i)} * delta_i

where ``out_i = W x_i + bias`` is the base output. Such a slot's ``B`` is stored already scaled by ``r`` (row
``j`` of ``s B`` times ``r_j``; lora_slots.py), so its term is ``r * delta`` as it comes out of the GEMMs and
only the base output needs the scale: ``r * out + shift`` with ``shift = (1 - r) * bias``.

The step's rows come as segments (a decode row, a prompt chunk); adjacent segments of one slot merge into
runs. The term's cost is not its flops but the passes over memory around them (the row gathers of a padded
layout, a separate delta tensor and its ``add_``; benchmarks/serve_engine.py has the figures). So there are
two paths, picked per batch (``LoraBatch.by_runs``):

* runs (few runs, or long ones such as prompt chunks): per run, two GEMMs on views of the activation, the
  second one ``addmm_`` straight into the base output: no gathers, no padding, no temporary the size of it;
  a row-scaled slot's run has its base output rescaled in place just before;
* the padded layout (many short runs: decode rows of interleaved adapters): rows grouped by slot as
  ``(chunks, m, d_in)`` (a group larger than ``m`` rows cut into chunks of m, so the layout never exceeds
  ``2 N + G`` rows for N rows in G groups), then two ``torch.bmm`` between two row gathers, as Punica's SGMV
  (arXiv:2310.18547)::

    x ──gather──► (C, m, d_in) ──bmm A^T──► (C, m, r) ──bmm Bt──► (C, m, d_out) ──gather──► + out

  and, when a row-scaled slot is in the batch, the add becomes ``out * r + term`` in one pass (``addcmul``),
  ``r`` gathered per row (ones for plain slots and the base model), the shift added to the term per chunk,
  before its gather. Where the layout is the activation itself (every group a whole chunk, in order), the
  scale and the shift are applied per chunk, with no gather at all.

A batch without a row-scaled slot makes no pass for the scale. When one run covers every row and there are
at least ``merged_rows`` of them (a prompt of one adapter), lora_slots.py runs the base layer on a temporary
``W + Bt^T A`` (``diag(r) (W + Bt^T A)`` for a row-scaled slot) instead: one GEMM, no pass over the output.

``lora_delta`` is the one entry point, so a fused GPU kernel (vLLM's ``punica_wrapper``, a triton SGMV/BGMV)
can stand beside these paths behind the same signature, picked by ``x.device``; everything here is plain
torch and runs on CUDA as it is. lora_slots.py owns the stacked tensors and calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The per-run path's rule: a run costs two small GEMMs of fixed overhead each, the padded layout two gathers
# of every adapted row; few runs, or long ones (prompt chunks), are cheaper one by one.
MAX_RUNS = 4
LONG_RUN = 16


@dataclass
class RowScales:
    """The row scales of one module's slots, for a batch that reads at least one row-scaled slot.

    ``scale (slots + 1, d_out)`` float32: ``r`` per slot, ones for a plain slot and in the last row (the base
    model's rows); ``shift`` the same shape, ``(1 - r) * bias``, or None for a module without a bias;
    ``slots``: the batch's row-scaled slots.
    """

    scale: Tensor
    shift: Tensor | None
    slots: frozenset[int]

    def apply(self, out: Tensor, slot: int) -> None:
        """``out = r * out + (1 - r) * bias`` in place, for rows of ``out`` (the base output) on ``slot``."""
        out.mul_(self.scale[slot])
        if self.shift is not None:
            out.add_(self.shift[slot])

    def shift_chunks(self, slots: Tensor) -> Tensor | None:
        """The shift of each chunk of a padded layout, its chunks on ``slots``: ``(chunks, 1, d_out)``; None
        without a bias."""
        return None if self.shift is None else self.shift.index_select(0, slots).unsqueeze(1)


class LoraBatch:
    """Which rows of a flattened ``(rows, d)`` activation use which slot, and how ``lora_delta`` computes them.

    ``segments``: ``(slot, first_row, n_rows)`` triples; rows of the base model are left out. Adjacent
    segments of one slot merge into ``runs`` ``(slot, first_row, end_row)``. ``by_runs``: the term is
    computed run by run on views of the activation, added in place (``MAX_RUNS`` / ``LONG_RUN``). Otherwise
    the rows are laid out for ``torch.bmm``: ``gather`` picks the padded layout's rows from the activation;
    ``scatter`` picks each activation row's result back from the layout's output, whose extra last row is zero
    (rows of the base model). Both are gathers: ``index_add_`` would do the same but is orders of magnitude
    slower on CPU.
    """

    def __init__(self, segments: list[tuple[int, int, int]], rows: int, device: torch.device | str = "cpu",
                 by_runs: bool | None = None) -> None:
        runs: list[tuple[int, int, int]] = []
        for slot, start, count in segments:
            if count <= 0:
                continue
            if runs and runs[-1][0] == slot and runs[-1][2] == start:
                runs[-1] = (slot, runs[-1][1], start + count)
            else:
                runs.append((slot, start, start + count))
        self.runs = runs
        self.rows, self.device = rows, device
        self._row_slots: Tensor | None = None
        # One run over every row: the slot, whose merged weight may be cheaper than the term (merged_rows).
        self.whole = runs[0][0] if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == rows else None
        self.slots = frozenset(slot for slot, _, _ in runs)
        self.empty = not runs
        adapted = sum(end - start for _, start, end in runs)
        if by_runs is None:
            by_runs = len(runs) <= MAX_RUNS or adapted >= LONG_RUN * len(runs)
        self.by_runs = by_runs
        if self.empty or self.by_runs:
            return
        groups: dict[int, list[int]] = {}
        for slot, start, end in runs:
            groups.setdefault(slot, []).extend(range(start, end))
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

    def row_slots(self, base: int) -> Tensor:
        """Each row's slot, ``base`` for the base model's rows: a gather index into per-slot rows (RowScales),
        built on first use and shared by every layer of the step."""
        if self._row_slots is None:
            index = [base] * self.rows
            for slot, start, end in self.runs:
                index[start:end] = [slot] * (end - start)
            self._row_slots = torch.tensor(index, dtype=torch.long, device=self.device)
        return self._row_slots

    @classmethod
    def for_rows(cls, row_slots: list[int | None], device: torch.device | str = "cpu",
                 by_runs: bool | None = None) -> "LoraBatch":
        """One row per entry (decode): the slot of each row, None for the base model."""
        return cls([(s, i, 1) for i, s in enumerate(row_slots) if s is not None], len(row_slots), device, by_runs)


def merged_rows(d_in: int, d_out: int) -> int:
    """Rows from which ``W + Bt^T A`` (``2 r d_in d_out`` flops, one weight-sized temporary) costs less than the
    term on every row (``2 n r (d_in + d_out)`` flops and a pass over the output, which dominates on CPU)."""
    return d_in * d_out // (d_in + d_out)


def lora_delta(x: Tensor, batch: LoraBatch, A: Tensor, Bt: Tensor, rank: int, out: Tensor | None = None,
               rows: RowScales | None = None) -> Tensor:
    """``out (rows, d_out)`` plus the LoRA term of flattened activations ``x (rows, d_in)``, added in place and
    returned (zero on base-model rows); without ``out``, the term alone.

    ``A (slots, max_rank, d_in)`` and ``Bt (slots, max_rank, d_out)`` are the stacked factors, ``(s B)^T`` in
    ``Bt`` (``(s B)^T`` times ``r`` per column for a row-scaled slot); only their first ``rank`` rows are read
    (rows past an adapter's own rank are zero). With ``rows`` (the batch reads a row-scaled slot; ``out`` is
    then the base output, bias included), the rows of each row-scaled slot end as
    ``r * out + (1 - r) * bias + term``, which is ``r * (W x + s B A x) + bias``.
    """
    if out is None:
        out = x.new_zeros(x.shape[0], Bt.shape[-1])
    if batch.empty:
        return out
    if batch.by_runs:
        for slot, start, end in batch.runs:
            if rows is not None and slot in rows.slots:
                rows.apply(out[start:end], slot)
            out[start:end].addmm_(torch.mm(x[start:end], A[slot, :rank].T), Bt[slot, :rank])
        return out
    _padded_delta(x, batch, A, Bt, rank, out, rows)
    return out


def _padded_delta(x: Tensor, batch: LoraBatch, A: Tensor, Bt: Tensor, rank: int, out: Tensor,
                  rows: RowScales | None) -> None:
    """The term through the padded layout, added into ``out`` in place (``out * r + shift + term`` with
    ``rows``)."""
    if batch.slot_range is not None:
        A = A[batch.slot_range[0]:batch.slot_range[1], :rank]
        Bt = Bt[batch.slot_range[0]:batch.slot_range[1], :rank]
    else:
        A = A[:, :rank].index_select(0, batch.slot_index)
        Bt = Bt[:, :rank].index_select(0, batch.slot_index)
    d_in, d_out = A.shape[-1], Bt.shape[-1]
    if batch.identity:
        h = torch.bmm(x.view(batch.chunks, batch.m, d_in), A.transpose(1, 2))
        chunks = out.view(batch.chunks, batch.m, d_out)
        if rows is not None:
            chunks.mul_(rows.scale.index_select(0, batch.slot_index).unsqueeze(1))
            if rows.shift is not None:
                chunks.add_(rows.shift_chunks(batch.slot_index))
        chunks.baddbmm_(h, Bt)
        return
    xs = x.index_select(0, batch.gather).view(batch.chunks, batch.m, d_in)
    h = torch.bmm(xs, A.transpose(1, 2))
    if batch.valid is not None:
        h = h * batch.valid.to(h.dtype)  # padding rows contribute exactly zero (valid is float32)
    y = x.new_empty(batch.chunks * batch.m + 1, d_out)
    y[-1].zero_()
    torch.bmm(h, Bt, out=y[:-1].view(batch.chunks, batch.m, d_out))
    if rows is None:
        out.add_(y.index_select(0, batch.scatter))
        return
    if rows.shift is not None:  # padding rows get it too, but are never picked back
        y[:-1].view(batch.chunks, batch.m, d_out).add_(rows.shift_chunks(batch.slot_index))
    scale = rows.scale.index_select(0, batch.row_slots(rows.scale.shape[0] - 1))
    torch.addcmul(y.index_select(0, batch.scatter), out, scale, out=out)
