"""The served form of an adapter on one module, which every method hands the engines, the fold and the merge.

Shapes follow PEFT's storage: base ``W (d_out x d_in)``, ``A (r x d_in)``, ``B (d_out x r)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LoraFactors:
    """The served form of an adapter on one module, one of two forms.

    Plain (``magnitude`` None), an exact plain LoRA::

        W' = W + s B A                        y = W x + s B A x + bias

    Row-scaled (``magnitude`` m set; DoRA's form, arXiv:2402.09353, PEFT's ``use_dora``): every output row of
    the adapted weight is rescaled to the length ``m``::

        W' = diag(r) (W + s B A),      r = m / ||W + s B A||_row      y = r * (W x + s B A x) + bias

    ``||.||_row`` is the 2-norm of each output row, over d_in, in PEFT's orientation (GPT-2's Conv1D stores W
    transposed); the bias is not scaled. ``r`` depends on the base weight, so the row-scaled form has no exact
    plain-LoRA export: it is folded, merged and served on the torch engine, never written as a LoRA.
    """

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float
    magnitude: Tensor | None = None  # (d_out,) float32; None: plain LoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def row_scaled(self) -> bool:
        return self.magnitude is not None

    def low_rank_weight(self, device: torch.device | None = None) -> Tensor:
        """Dense ``scale * B @ A`` in fp32, shape (d_out, d_in), on ``device`` (the factors' own by default):
        the whole delta of the plain form."""
        return (self.B.to(device).float() @ self.A.to(device).float()) * self.scale

    def row_scale(self, weight: Tensor) -> Tensor | None:
        """``r = m / ||W + s B A||_row`` (d_out,) in fp32 for the base ``weight`` W (d_out, d_in), on its device;
        None if plain. A row whose adapted weight is all zero gives inf or NaN: the caller checks finiteness."""
        if self.magnitude is None:
            return None
        return self._scale_of(weight.float() + self.low_rank_weight(weight.device))

    def folded_weight(self, weight: Tensor) -> Tensor:
        """``W'`` in fp32 for the base ``weight`` W (d_out, d_in), on its device: ``W + s B A``, or
        ``diag(r) (W + s B A)``."""
        adapted = weight.float() + self.low_rank_weight(weight.device)
        return adapted if self.magnitude is None else adapted * self._scale_of(adapted).unsqueeze(1)

    def row_scale_problem(self, weight: Tensor) -> str | None:
        """Why ``r`` is not finite for the base ``weight`` W (d_out, d_in), in one line, or None (plain, or fine):
        a row of ``W + s B A`` whose norm is zero (``m / 0``), or values too large for fp32."""
        scale = self.row_scale(weight)
        if scale is None or bool(torch.isfinite(scale).all()):
            return None
        adapted_norm = (weight.float() + self.low_rank_weight(weight.device)).norm(dim=1)
        zero = torch.nonzero(adapted_norm == 0).flatten().tolist()
        if zero:
            return (f"row {zero[0]} of W + s B A has norm 0 ({len(zero)} such row(s)), so its row scale "
                    f"m / ||W + s B A|| divides by zero; the adapter does not fit this base weight")
        bad = torch.nonzero(~torch.isfinite(scale)).flatten().tolist()
        return f"row {bad[0]}'s scale m / ||W + s B A|| is not finite ({len(bad)} such row(s))"

    def _scale_of(self, adapted: Tensor) -> Tensor:
        return self.magnitude.to(adapted.device).float() / adapted.norm(dim=1)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        """Dense fp32 ``W' - W``, shape (d_out, d_in): ``s B A``, or ``diag(r) (W + s B A) - W``, which needs
        the base ``weight`` W (d_out, d_in) (ValueError without it)."""
        if self.magnitude is None:
            return self.low_rank_weight()
        if weight is None:
            raise ValueError("a row-scaled adapter's delta depends on the base weight (its rows are rescaled to "
                             "the magnitude m); pass the base weight W (d_out, d_in)")
        return self.folded_weight(weight) - weight.float()

    def tensors(self) -> tuple[tuple[str, Tensor], ...]:
        """The form's tensors, named for messages: A, B and, if row-scaled, the magnitude."""
        named = (("LoRA factor A", self.A), ("LoRA factor B", self.B))
        return named if self.magnitude is None else (*named, ("magnitude vector", self.magnitude))

    def non_finite(self) -> str | None:
        """Where NaN or inf values are, ``"its LoRA factor A holds 3 NaN or inf value(s) of 64"``, or None.

        A diverged training run or a damaged file; folded or served, such a factor spreads NaN to every row
        it touches, and nothing downstream complains, so merge and every engine refuse it by this check."""
        for name, value in self.tensors():
            bad = int(value.numel() - torch.isfinite(value).sum())
            if bad:
                return f"its {name} holds {bad} NaN or inf value(s) of {value.numel()}"
        return None

    def overflow(self, dtype: torch.dtype) -> str | None:
        """What of the served form overflows ``dtype``, ``"scale 4 x lora_B reaches 7.1e+04, beyond the largest
        finite float16 value 6.55e+04"``, or None.

        The served form is A and ``scale * B`` in the serving dtype, and an engine may fold ``scale * B @ A``
        into a temporary weight of that dtype (a batch on one adapter), so each must be finite there. The
        dense delta is bounded without forming it: ``|(B A)_ij| <= ||B_i|| ||A_:,j||`` (Cauchy-Schwarz), in
        float64 so that the check itself cannot overflow. An adapter past it loads fine and then turns every
        request's activations into inf and NaN; a trained adapter is many orders of magnitude below it.

        Row-scaled, every entry of ``diag(r) (W + s B A)`` is at most ``|m_i|`` (row i has length ``|m_i|``),
        so ``m`` bounds the folded weight; ``r`` itself depends on the base weight and is checked where it is
        computed (the engine's adapter read)."""
        if not self.A.numel() or not self.B.numel():
            return None
        limit, s = torch.finfo(dtype).max, abs(float(self.scale))
        A, B = self.A.double(), self.B.double()
        bounds = [("lora_A reaches", A.abs().max()), (f"scale {self.scale:g} x lora_B reaches", B.abs().max() * s),
                  (f"the delta scale {self.scale:g} x lora_B @ lora_A may reach",
                   B.norm(dim=1).max() * A.norm(dim=0).max() * s)]
        if self.magnitude is not None and self.magnitude.numel():
            bounds.append(("the magnitude reaches", self.magnitude.double().abs().max()))
        for what, value in bounds:
            if float(value) > limit:
                return (f"{what} {float(value):.3g}, beyond the largest finite "
                        f"{str(dtype).removeprefix('torch.')} value {limit:.3g}")
        return None
