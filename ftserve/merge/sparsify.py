"""Merge, sparsifying a task vector in bounded memory: exact magnitude cut points and seeded random masks.

**Magnitude cut points.** mergekit keeps the ``k`` largest ``|delta|`` of a tensor (``sparsify.magnitude``) or
the ranks ``[n_bot, n_bot + target_n)`` of an ascending sort (``magnitude_outliers``), by sorting the whole
tensor. A streamed merge never holds the whole tensor, so the magnitude at a rank is found exactly by histograms
of the magnitudes' bit patterns, pass by pass: for non-negative floats the order of the bit patterns is the order
of the values. A key is ``|x|``'s pattern in the math dtype for 16-bit dtypes (15 bits: one pass of 2^15 bins),
else the pattern of ``|x|`` rounded to fp32 (mergekit compares in fp32; 31 bits: two passes, the high 15 bits,
then the low 16 among the keys that share them)::

    pass:   count the keys whose known high bits equal the prefix, by their next bits
    narrow: the bin where the running count passes the rank extends the prefix

Memory: one block's keys and one histogram per search (at most 2^16 counts).

**Ties.** mergekit picks among elements tied at a cut by torch's unstable sort (on CPU libstdc++'s introsort,
whose choice among equal magnitudes depends on every magnitude of the tensor). For its top-k (``magnitude``)
the whole tensor's keys are gathered and introsort's partitions replayed (introsort.py: ``top_k_as_sorted``),
so the kept set is mergekit's exactly. For breadcrumbs' ranks (``magnitude_outliers``) ties are taken in flat
index order, counted across blocks by a pass that records each row's ties (O(rows) state); where the magnitude
at a cut is not tied, the kept set is mergekit's exactly.

**Random masks** (DARE, DELLA). Not a global RNG stream, which would depend on the order tensors are merged in:
the flat elements of a tensor are cut into chunks of ``MASK_CHUNK``, and chunk ``c`` of input ``i`` of tensor
``name`` draws ``torch.rand(len, generator=Generator().manual_seed(h))``, ``h`` a hash of ``(seed, name, i, c)``.
Any block of any size reads the same numbers, on any machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .introsort import kept_at_cut

MASK_CHUNK = 2**16
PASS_BITS = 16  # bits of the key resolved by each histogram pass (the first resolves what is left over)


def key_bits(dtype: torch.dtype) -> int:
    """Width of a magnitude key (see ``magnitude_keys``)."""
    return 15 if dtype.itemsize == 2 else 31


def key_passes(dtype: torch.dtype) -> int:
    return -(-key_bits(dtype) // PASS_BITS)


def magnitude_keys(x: Tensor) -> Tensor:
    """int32 keys ordered as ``|x|`` is ordered when compared in fp32 (as mergekit compares)."""
    if x.dtype.itemsize == 2:
        return x.abs().view(torch.int16).to(torch.int32)
    return x.abs().float().view(torch.int32)


@dataclass
class RankSearch:
    """The key at ascending position ``position`` (0-based) among a tensor's keys, found one pass at a time.

    After the last pass: ``prefix`` is the key, ``below`` counts the keys smaller than it, ``equal`` those equal."""

    position: int
    bits: int
    prefix: int = 0
    known: int = 0
    below: int = 0
    equal: int = 0

    @property
    def width(self) -> int:
        remaining = self.bits - self.known
        return remaining - PASS_BITS * ((remaining - 1) // PASS_BITS)

    def histogram(self, keys: Tensor) -> Tensor:
        """Counts of the next ``width`` bits among ``keys`` that share the bits found so far."""
        shift = self.bits - self.known - self.width
        if self.known:
            keys = keys[(keys >> (self.bits - self.known)) == self.prefix]
        return torch.bincount(((keys >> shift) & ((1 << self.width) - 1)).flatten(), minlength=1 << self.width)

    def narrow(self, counts: Tensor) -> None:
        """Extend the prefix by the bin holding ``position``, from the whole tensor's ``histogram``."""
        running = torch.cumsum(counts, 0)
        b = int(torch.searchsorted(running, self.position - self.below, right=True))
        self.below += int(running[b - 1]) if b else 0
        self.prefix = (self.prefix << self.width) | b
        self.known += self.width
        if self.known == self.bits:
            self.equal = int(counts[b])


@dataclass
class Bound:
    """One side of a kept range of magnitudes: keys past ``value`` on the kept side (above it when ``above``),
    and of the keys equal to it those at tie positions ``[first, stop)`` (flat index order), or, where ``kept``
    is given, those at the flat indices it lists (sorted)."""

    value: int
    above: bool
    first: int
    stop: int
    equal: int
    kept: Tensor | None = None

    def keeps_listed(self, keys: Tensor, first: int) -> Tensor:
        """Which of ``keys`` (a block starting at flat index ``first``) this bound keeps, from ``kept``."""
        inside = keys > self.value if self.above else keys < self.value
        lo, hi = (int(torch.searchsorted(self.kept, i)) for i in (first, first + keys.numel()))
        inside.view(-1)[self.kept[lo:hi] - first] = True
        return inside

    @property
    def needs_positions(self) -> bool:
        """Whether some ties are kept and others not, so that each tie's position matters."""
        return self.first < self.stop and (self.first > 0 or self.stop < self.equal)

    def keeps(self, keys: Tensor, first_tie: int | None) -> Tensor:
        """Which of ``keys`` (a block of rows) this bound keeps; ``first_tie``: the tie position of the block's
        first key equal to ``value`` (None where positions do not matter)."""
        inside = keys > self.value if self.above else keys < self.value
        if self.first >= self.stop:
            return inside
        tied = keys == self.value
        if first_tie is None:
            return inside | tied
        ties = torch.nonzero(tied.flatten()).flatten()  # this block's ties, in flat order
        inside.view(-1)[ties[max(0, self.first - first_tie):max(0, self.stop - first_tie)]] = True
        return inside


def top_k_as_sorted(keys: Tensor, k: int) -> Bound:
    """The bound keeping the ``k`` largest of ``keys`` (a whole tensor's, flat; consumed) that mergekit keeps,
    ties as its ``argsort(descending=True)`` on CPU leaves them (introsort.py)."""
    value, kept = kept_at_cut(keys, k)
    return Bound(value, True, 0, 0, len(kept), kept)


def uniforms(seed: int, name: str, index: int, numel: int, lo: int, hi: int, out: Tensor | None = None) -> Tensor:
    """fp32 uniforms in [0, 1) for flat elements ``[lo, hi)`` of input ``index`` of tensor ``name`` (the module
    docstring), the same whatever block they are read in; written into ``out`` (``hi - lo`` fp32) when given.
    A whole chunk is drawn in place (``uniform_`` draws what ``rand`` draws); a chunk cut by the block's ends
    is drawn whole and cut."""
    out = torch.empty(hi - lo) if out is None else out
    for c in range(lo // MASK_CHUNK, -(-hi // MASK_CHUNK)):
        begin = c * MASK_CHUNK
        digest = hashlib.blake2b(f"{seed}\0{name}\0{index}\0{c}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        size, first, last = min(MASK_CHUNK, numel - begin), max(lo - begin, 0), min(hi - begin, MASK_CHUNK)
        target = out[begin + first - lo:begin + last - lo]
        if first == 0 and last == size:
            target.uniform_(0, 1, generator=generator)
        else:
            target.copy_(torch.rand(size, generator=generator)[first:last])
    return out


def pack_bits(flags: Tensor) -> Tensor:
    """``flags`` (bool, contiguous) as uint8 bits, eight to a byte, the first in the lowest bit (numpy's
    packbits: many times torch's shifts and sums)."""
    return torch.from_numpy(np.packbits(flags.numpy().reshape(-1), bitorder="little"))


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    """The first ``count`` flags of ``bits`` (pack_bits), as bool."""
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count, bitorder="little").view(np.bool_))


def l1_scale(before: float, after: float, dtype: torch.dtype, eps: float = 1e-7) -> Tensor | None:
    """mergekit's L1 rescale factor ``before / after`` in ``dtype`` from the two whole-tensor sums (float64 sums
    of per-row float64 sums, rounded to fp32 then ``dtype``), or None where mergekit leaves the masked tensor
    as it is (either sum below ``eps``)."""
    before_t = torch.tensor(before, dtype=torch.float64).float().to(dtype)
    after_t = torch.tensor(after, dtype=torch.float64).float().to(dtype)
    if before_t < eps or after_t < eps:
        return None
    return before_t / after_t


def row_l1(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """float64 sums of ``|x|`` per row of the (rows, cols) view: summed in row order, whole-tensor sums do not
    depend on how rows are cut into blocks. ``scratch``: float64 of x's size for ``|x|``, if given (``x.abs()
    .sum(dim=1, dtype=float64)`` makes the same float64 copy, and sums it as this does)."""
    x = x.reshape(len(x), -1)
    magnitudes = x.double() if scratch is None else scratch.view(x.shape).copy_(x)
    return magnitudes.abs_().sum(dim=1)
