"""Merge, to an adapter, the math: how the served forms ``(A_k, B_k, s_k)`` of the adapters targeting one module,
with merge weights ``w_k``, become that module's new plain LoRA ``(A', B')``, as PEFT's
``LoraModel.add_weighted_adapter`` (0.22) combines them. Reading the adapters, the checks and the folder written
are ``adapter_merge``'s.

``cat`` (exact; rank = the sum of the ranks)::

    A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]      B' = [B_1, B_2, ...]      B' A' = sum_k w_k s_k B_k A_k

``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (every adapter of the same rank) combine
the A's and, apart, the B's, each as a task vector, with ``w_k s_k`` split over the two factors (its sign on A)::

    A' = combine(A_k, sign(w_k s_k) sqrt|w_k s_k|)      B' = combine(B_k, sqrt|w_k s_k|)

``svd`` and ``<method>_svd`` combine the dense deltas ``Delta_k = s_k B_k A_k`` with the weights ``w_k`` and
truncate the result to rank ``R`` (default: the largest input rank; never above ``min(d_out, d_in)``, where
the truncation is exact)::

    Delta = combine(Delta_k, w_k) = U S V^T      B' = U_R S_R      A' = V_R^T

optionally clamped (PEFT's ``svd_clamp``): both factors to ``[-q, q]``, ``q`` the ``clamp`` quantile of all
their values together. ``svd``'s combination is the weighted sum, whose rank is at most the sum of the input
ranks: it is truncated through ``cat``'s factors (``_factored_svd``), exactly and without a dense SVD; the
pruning methods' combinations are of full rank, and take PEFT's dense SVD. The new adapter has scale 1
(``lora_alpha = r``), as PEFT's, and is written in fp32.

``combine`` (``peft.utils.merge_utils``): ``linear`` sums ``w_k x_k``. ``magnitude_prune`` first keeps the
``int(density * numel)`` largest ``|x_k|`` of each input (the tied ones at the cut in flat index order: same
result on every machine). ``dare_*`` (DARE, arXiv:2311.03099) keep each element with probability ``density`` and
divide the kept ones by it. ``ties`` / ``dare_ties`` (TIES, arXiv:2306.01708) then elect a sign per element from
the pruned, *unweighted* inputs (``total``: the sign of their sum; ``frequency``: of their count of signs; zero
counts as +) and average the weighted values that agree with it, over how many agree.

DARE's draws: each module has its own generator, ``torch.Generator().manual_seed(h)``,
``h = blake2b(f"{seed}\\0{module}")`` (``module_seed``); it draws PEFT's Bernoulli masks in PEFT's order (the
A's of every input, then the B's; or the deltas, in PEFT's orientation, transposed for ``fan_in_fan_out``).
PEFT draws from the global generator module after module in the model's order, which a merge without the model
cannot know; per-module generators give the same output for the same seed on any machine, and for one module
the same as PEFT after ``torch.manual_seed(module_seed(seed, module))``.

Each module's reference, against which ``adapter_merge`` measures the relative error: the dense combination for
``svd`` / ``*_svd`` (what the truncation lost), the plain weighted sum ``sum_k w_k s_k B_k A_k`` for the rest
(what the method changed).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import LoraFactors

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on A and B apart, equal ranks
DENSE_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *DENSE_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """How task vectors combine (``combine`` in the module docstring), and the parameters it takes."""

    prune: str | None  # "magnitude", "random" (DARE) or None
    elect_sign: bool   # TIES' sign election and disjoint mean

    @classmethod
    def of(cls, method: str) -> "Combination":
        name = method.removesuffix("_svd")
        prune = "random" if name.startswith("dare_") else "magnitude" if name in ("ties", "magnitude_prune") else None
        return cls(prune, name.endswith("ties"))

    def combine(self, tensors: list[Tensor], weights: list[float], density: float | None, sign_method: str,
                generator: torch.Generator) -> Tensor:
        """The combination of same-shaped fp32 ``tensors`` with ``weights``."""
        if self.prune == "magnitude":
            tensors = [keep_largest(t, density) for t in tensors]
        elif self.prune == "random":
            tensors = [_drop_at_random(t, density, generator) for t in tensors]
        stacked = torch.stack(tensors)
        weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
        if not self.elect_sign:
            return weighted.sum(dim=0)
        votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
        agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def keep_largest(x: Tensor, density: float) -> Tensor:
    """``x`` with all but its ``k = int(density * numel)`` largest magnitudes zeroed: those above the k-th
    largest, then those equal to it in flat index order until ``k`` (so the result is the same on every machine;
    PEFT's ``topk`` picks among such ties as its kernel happens to). Density 1 keeps all."""
    if density >= 1:
        return x
    magnitude = x.abs().flatten()
    k = int(density * magnitude.numel())
    if k == 0:
        return torch.zeros_like(x)
    cut = magnitude.kthvalue(magnitude.numel() - k + 1).values
    keep = magnitude > cut
    tied = magnitude == cut
    keep |= tied & (tied.cumsum(0) <= k - int(keep.sum()))
    return (x.flatten() * keep).view_as(x)


def _drop_at_random(x: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: each element kept with probability ``density`` (PEFT's Bernoulli draw) and the kept ones divided by
    it, so that the expected value is ``x``. Density 1 draws nothing and keeps all, as PEFT."""
    if density >= 1:
        return x
    return x * torch.bernoulli(torch.full_like(x, density), generator=generator) / density


def module_seed(seed: int, module: str) -> int:
    """The seed of ``module``'s generator for DARE's draws: 63 bits of blake2b over the seed and the name."""
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def merge_module(method: str, module: str, parts: list[tuple[float, LoraFactors]], *, rank: int | None,
                 density: float | None, sign_method: str, clamp: float | None, seed: int,
                 fan_in_fan_out: bool) -> tuple[Tensor, LoraFactors]:
    """The dense reference of ``module`` (see the module docstring) and its merged factors, by ``method``, from
    its ``parts`` (weight, served form); ``rank`` is the ``svd`` methods' truncation rank (given there)."""
    combination = Combination.of(method)
    generator = torch.Generator().manual_seed(module_seed(seed, module))
    if method == "svd":
        joined = _cat(parts)
        return joined.low_rank_weight(), _truncate(*_factored_svd(joined.B, joined.A), rank, clamp)
    if method in DENSE_METHODS:
        target = _dense_merge(combination, parts, density, sign_method, generator, fan_in_fan_out)
        return target, _truncate(*torch.linalg.svd(target, full_matrices=False), rank, clamp)
    merged = _cat(parts) if method == "cat" else _factor_merge(combination, parts, density, sign_method, generator)
    return _weighted_sum(parts), merged


def relative_error(reference: Tensor, factors: LoraFactors) -> float:
    """``||reference - s B A||_F / ||reference||_F``, 0 for a zero reference."""
    norm = torch.linalg.matrix_norm(reference)
    residual = torch.linalg.matrix_norm(reference - factors.low_rank_weight())
    return float(residual / norm) if norm > 0 else 0.0


def _weighted_sum(parts: list[tuple[float, LoraFactors]]) -> Tensor:
    return sum(weight * f.low_rank_weight() for weight, f in parts)


def _cat(parts: list[tuple[float, LoraFactors]]) -> LoraFactors:
    A = torch.cat([f.A.float() * (weight * f.scale) for weight, f in parts])
    return LoraFactors(A, torch.cat([f.B.float() for _, f in parts], dim=1), 1.0)


def _factor_merge(combination: Combination, parts: list[tuple[float, LoraFactors]], density: float | None,
                  sign_method: str, generator: torch.Generator) -> LoraFactors:
    roots = [math.sqrt(abs(weight * f.scale)) for weight, f in parts]
    signs = [1.0 if weight * f.scale >= 0 else -1.0 for weight, f in parts]
    A = combination.combine([f.A.float() for _, f in parts], [r * s for r, s in zip(roots, signs)], density,
                            sign_method, generator)
    B = combination.combine([f.B.float() for _, f in parts], roots, density, sign_method, generator)
    return LoraFactors(A, B, 1.0)


def _dense_merge(combination: Combination, parts: list[tuple[float, LoraFactors]], density: float | None,
                 sign_method: str, generator: torch.Generator, fan_in_fan_out: bool) -> Tensor:
    """The combined dense delta (d_out, d_in); combined in PEFT's orientation, so that DARE's draws fall as
    PEFT's do (transposed where the base stores the weight transposed)."""
    deltas = [f.low_rank_weight() for _, f in parts]
    if fan_in_fan_out:
        deltas = [d.T for d in deltas]
    merged = combination.combine(deltas, [weight for weight, _ in parts], density, sign_method, generator)
    return merged.T if fan_in_fan_out else merged


def _factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U S V^T`` of ``B @ A`` (B: d_out x r, A: r x d_in) without forming it, in
    ``O((d_out + d_in) r^2)``: with ``B = Q_B R_B`` and ``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T``, so
    the SVD of the small core ``R_B R_A^T = U' S V'^T`` gives ``U = Q_B U'``, ``V = Q_A V'``. Exact: the sum of
    several LoRAs has rank at most the sum of their ranks, which is all a dense SVD of it would find. In fp64,
    which costs little at these sizes, so the truncation is the exact one rounded to fp32."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.T.double())
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return (Q_B @ U).float(), S.float(), (Vh @ Q_A.T).float()


def _truncate(U: Tensor, S: Tensor, Vh: Tensor, rank: int, clamp: float | None) -> LoraFactors:
    """The rank-``rank`` truncation of the SVD ``U S V^T`` as ``B' = U S``, ``A' = V^T`` (PEFT's split),
    optionally clamped; all of it where ``rank`` is larger."""
    rank = min(rank, S.shape[0])
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        high = _quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return LoraFactors(A.contiguous(), B.contiguous(), 1.0)


def _quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile's linear interpolation, without its limit on the input's size."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return torch.lerp(ordered[below], ordered[above], position - below)
