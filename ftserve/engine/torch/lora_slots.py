"""Many adapters' LoRA factors in preallocated slots, applied to a batch of mixed adapters in one pass.

The idea of Punica (arXiv:2310.18547) and S-LoRA (arXiv:2311.03285): the base weight is shared, so one GEMM
serves every row, and each row ``i`` adds its own adapter's low-rank term::

    y_i = W x_i + B_{a(i)} (A_{a(i)} x_i)          (the scale s folded into B when a slot is written)

Every target module keeps two stacked tensors, allocated once on first use::

    A  (max_loras, max_rank, d_in)          rows past an adapter's rank are zero
    Bt (max_loras, max_rank, d_out)         (s B)^T; (diag(r) s B)^T for a row-scaled adapter (below)

A module on which some slot holds a row-scaled adapter (DoRA's form: ``y = r * (W x + s B A x) + bias``, the
row scale ``r`` computed once per adapter read from the served base weight) also keeps, allocated when the
first such adapter is written::

    scale (max_loras + 1, d_out)            r per slot, ones for a plain slot and in the base model's last row
    shift (max_loras + 1, d_out)            (1 - r) * bias, zeros likewise; only for a module with a bias

so that ``y = r * out + shift + Bt^T (A x)`` for the base output ``out = W x + bias``: the term comes out of the
GEMMs already scaled and only the base output takes ``r`` (kernels.py).

The term itself, over a batch whose rows each read one slot (or none, the base model), is ``lora_delta``
(kernels.py: per contiguous run of a slot, or through a padded layout for many short runs), added in place
into the base output, reading only the first ``r`` rows of each slot, ``r`` the largest rank among the
batch's adapters on that module, not ``max_rank``. The stored weights are never folded, so any mix of
adapters runs in the same forward; a batch whose every row reads one slot, with enough rows (``merged_rows``),
runs the base layer on a temporary merged weight instead, which is cheaper than the term on CPU. A batch reading
no row-scaled slot never touches ``scale``, so plain-LoRA serving costs what it did.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...methods.base import TARGETABLE, linear_shape, targetable_types
from .kernels import LoraBatch, RowScales, lora_delta, merged_rows


class SlotFactors(dict):
    """One adapter as the slots take it: module -> ``(A (r, d_in), B (d_out, r), scale)``, fp32; and, for a
    row-scaled adapter, ``row_scales``: module -> ``r (d_out,)`` fp32 (empty for a plain adapter)."""

    def __init__(self, factors=(), row_scales: dict[str, Tensor] | None = None) -> None:
        super().__init__(factors)
        self.row_scales = row_scales or {}


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
        self.scale: Tensor | None = None  # row scales, allocated with the first row-scaled adapter
        self.shift: Tensor | None = None
        self.scaled: set[int] = set()  # slots holding a row-scaled adapter
        # Only the plain types: a subclass (bitsandbytes' Linear4bit is an nn.Linear) may not hold its weight as
        # a dense matrix to add to.
        self.merge_rows = merged_rows(self.in_features, self.out_features) \
            if type(base_layer) in targetable_types() else None

    def _merged(self, x: Tensor, slot: int, r: int) -> Tensor:
        """Every row on one slot, enough of them: the base layer on a temporary merged weight, one GEMM;
        ``diag(r) W + Bt^T A``, which is ``diag(r) (W + s B A)``, for a row-scaled slot, its bias untouched."""
        base = self.base_layer
        linear = isinstance(base, nn.Linear)
        low = (self.Bt[slot, :r].T, self.A[slot, :r]) if linear else (self.A[slot, :r].T, self.Bt[slot, :r])
        if slot in self.scaled:  # W is (d_out, d_in), or Conv1D's (d_in, d_out): r along d_out either way
            r_out = self.scale[slot].unsqueeze(1) if linear else self.scale[slot]
            weight = torch.mul(base.weight, r_out, out=torch.empty_like(base.weight)).addmm_(*low)
        else:
            weight = torch.addmm(base.weight, *low)
        if linear:
            return F.linear(x, weight, base.bias)
        return torch.addmm(base.bias, x.reshape(-1, self.in_features), weight).view(*x.shape[:-1], -1)

    def _row_scales(self, slots: frozenset[int]) -> RowScales | None:
        """The row scales a batch on ``slots`` needs, None if it reads no row-scaled slot."""
        scaled = self.scaled.intersection(slots) if self.scaled else None
        return RowScales(self.scale, self.shift, frozenset(scaled)) if scaled else None

    def forward(self, x: Tensor) -> Tensor:
        batch = self.context.batch
        if batch is None or batch.empty or self.A is None:
            return self.base_layer(x)
        r = max(self.ranks[s] for s in batch.slots)
        if r == 0:
            return self.base_layer(x)
        if batch.whole is not None and self.merge_rows is not None and x.numel() >= self.merge_rows * self.in_features:
            return self._merged(x, batch.whole, r)
        out = self.base_layer(x)
        lora_delta(x.reshape(-1, self.in_features), batch, self.A, self.Bt, r, out.view(-1, self.out_features),
                   self._row_scales(batch.slots))
        return out

    @torch.no_grad()
    def write(self, slot: int, A: Tensor | None, B: Tensor | None, scale: float = 1.0,
              row_scale: Tensor | None = None) -> None:
        """Put one adapter's factors ``A (r, d_in)``, ``B (d_out, r)`` and, if row-scaled, its ``row_scale
        (d_out,)`` into ``slot``; None clears the slot."""
        self._write_row_scale(slot, row_scale if A is not None else None)
        old = self.ranks[slot]
        if A is None:
            if old:
                self.A[slot, :old].zero_()
                self.Bt[slot, :old].zero_()
                self.ranks[slot] = 0
            return
        if self.A is None:
            kw = self._weight_kw()
            self.A = torch.zeros(self.max_loras, self.max_rank, self.in_features, **kw)
            self.Bt = torch.zeros(self.max_loras, self.max_rank, self.out_features, **kw)
        r = A.shape[0]
        self.A[slot, :r].copy_(A)
        B = B.float() * scale
        self.Bt[slot, :r].copy_((B if row_scale is None else B * row_scale.float().unsqueeze(1)).T)
        if old > r:
            self.A[slot, r:old].zero_()
            self.Bt[slot, r:old].zero_()
        self.ranks[slot] = r

    def _weight_kw(self) -> dict:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": weight.dtype}

    def _write_row_scale(self, slot: int, row_scale: Tensor | None) -> None:
        """Set ``slot``'s row scale (and its bias shift), or reset it to ones for a plain adapter or none."""
        if row_scale is None:
            if slot in self.scaled:
                self.scale[slot].fill_(1.0)
                if self.shift is not None:
                    self.shift[slot].zero_()
                self.scaled.discard(slot)
            return
        bias = self.base_layer.bias
        if self.scale is None:
            device = self._weight_kw()["device"]
            self.scale = torch.ones(self.max_loras + 1, self.out_features, device=device)
            self.shift = None if bias is None else torch.zeros(self.max_loras + 1, self.out_features, device=device)
        self.scale[slot].copy_(row_scale)
        if self.shift is not None:
            self.shift[slot].copy_((1.0 - self.scale[slot]) * bias.float())
        self.scaled.add(slot)

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

    @property
    def dtype(self) -> torch.dtype:
        """The serving dtype adapters must fit (adapter_files.read_checked): the base layers' float dtype, float32
        where none is a float."""
        weights = (layer.base_layer.weight.dtype for layer in self.layers.values())
        return next((d for d in weights if d.is_floating_point), torch.float32)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adaptable module, by name."""
        return {name: (layer.out_features, layer.in_features) for name, layer in self.layers.items()}

    def base_weight(self, name: str) -> Tensor:
        """The served base weight of module ``name`` in fp32, PEFT's orientation (d_out, d_in); ValueError for a
        layer that holds no dense weight (a quantized one)."""
        layer = self.layers[name]
        if layer.merge_rows is None:
            raise ValueError(f"{name} is a {type(layer.base_layer).__name__}, whose weight is not a dense matrix")
        weight = layer.base_layer.weight.float()
        return weight if isinstance(layer.base_layer, nn.Linear) else weight.T

    def write(self, slot: int, factors: SlotFactors) -> None:
        """Fill ``slot`` with an adapter's ``(A, B, scale)`` per module, and its row scales if it has them; every
        other module's slot is cleared."""
        for name, layer in self.layers.items():
            layer.write(slot, *factors.get(name, (None, None)), row_scale=factors.row_scales.get(name))

    def clear(self, slot: int) -> None:
        self.write(slot, SlotFactors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.A, layer.Bt, layer.scale, layer.shift) if t is not None)
