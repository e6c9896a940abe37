"""Merge, mergekit's tie-break at a magnitude cut: which elements torch's CPU sort puts among its first ``k``.

mergekit keeps a tensor's ``k`` largest ``|delta|`` as ``torch.argsort(w, descending=True)[:k]``, and on CPU
that is libstdc++'s ``std::sort`` (introsort, not stable) over (value, index) pairs: where several magnitudes
tie at the cut, which of them are kept depends on how introsort moved them. Elements only move by comparisons
of their values, so sorting the magnitudes' keys (sparsify.magnitude_keys: same order) moves them the same way.

Which elements end up in ``[0, k)`` needs only the partitions of the segments that hold position ``k``, as in a
quickselect: introsort partitions ``[first, last)`` at a cut and never moves an element across it again. Here
each such partition is replayed exactly, vectorized, then the last segment (at most ``THRESHOLD`` elements) is
insertion-sorted (stable) as introsort's last pass sorts it. libstdc++ (``bits/stl_algo.h``)::

    while last - first > 16:                       # __introsort_loop, depth limit 2 floor(log2 n)
        median of (first + 1, mid, last - 1) swapped to first     # __move_median_to_first
        cut = __unguarded_partition(first + 1, last, pivot = *first):
            loop: i skips x before pivot; j skips (from the right) x after pivot; stop if i >= j; swap; ++i
        recurse on [cut, last); last = cut

Replayed: the left stops are the elements "not before" the pivot in index order (``L``), the right stops those
"not after" it from the right (``R``); the partition swaps ``L[m]`` with ``R[m]`` for every ``m < swaps``,
``swaps = max_p min(#L below p, #R at or above p)``, and cuts at ``min(L[swaps], R[swaps - 1])``. Where the
depth limit would switch introsort to heapsort the whole tensor is sorted as mergekit sorts it (``argsort``).

The passes run in numpy, whose counts and searches over a boolean mask are many times torch's on CPU.
Memory: the keys (2 or 4 bytes an element), their first positions (4 bytes), two boolean masks while a segment
is partitioned, and ``SWAP_BATCH`` pairs of positions at a time.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import Tensor

THRESHOLD = 16       # libstdc++'s _S_threshold: introsort leaves segments this short to its insertion sort
CHUNK = 2**16        # elements per count when locating a stop by its rank
SWAP_BATCH = 2**20   # pairs swapped per step


def kept_at_cut(keys: Tensor, k: int) -> tuple[int, Tensor]:
    """The smallest key that ``torch.argsort(keys, descending=True)[:k]`` holds, and the flat indices (sorted,
    int64) of the elements equal to it that it holds: the ties that mergekit keeps at its cut. ``keys``: 1-D
    integers, consumed (reordered in place)."""
    n = len(keys)
    if not 0 < k < n:
        raise ValueError(f"k = {k} outside (0, {n})")
    kv, ids = keys.numpy(), np.arange(n, dtype=np.int32)
    stops = np.empty((2, n), dtype=bool)  # each partition's masks, in views of these
    first, last, depth = 0, n, depth_limit(n)
    while last - first > THRESHOLD and first < k < last:
        if depth == 0:
            return _sorted_ties(kv, ids, k)
        depth -= 1
        segment, moved = kv[first:last], ids[first:last]
        _median_to_first(segment, moved)
        cut = first + 1 + _partition(segment[1:], moved[1:], int(segment[0]), stops[:, :last - first - 1])
        first, last = (cut, last) if cut <= k else (first, cut)
    if first < k < last:  # introsort's insertion sort, stable, on the last segment
        order = np.argsort(-kv[first:last].astype(np.int64), kind="stable")
        kv[first:last], ids[first:last] = kv[first:last][order], ids[first:last][order]
    top = kv[:k]  # the k largest, in no order outside the last segment
    value = top.min()
    return int(value), torch.from_numpy(np.sort(ids[:k][top == value]).astype(np.int64))


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's ``malloc_trim``; elsewhere nothing). A replay's
    masks and positions, a few MB to tens of MB, come from the heap once glibc has raised its mmap threshold,
    and tensor after tensor the freed ones fragment it: without this the peak RSS of a 2.7 GB merge doubles."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's where it is the C library
    except (AttributeError, OSError, TypeError):
        pass


def depth_limit(n: int) -> int:
    """Partitions introsort makes on a path before it turns to heapsort: ``2 floor(log2 n)``."""
    return 2 * (n.bit_length() - 1)


def _sorted_ties(kv: np.ndarray, ids: np.ndarray, k: int) -> tuple[int, Tensor]:
    """The answer by sorting as mergekit does (where introsort would turn to heapsort), from the first order."""
    original = np.empty_like(kv)
    original[ids] = kv
    keys = torch.from_numpy(original)
    order = torch.argsort(keys, descending=True)[:k]
    value = keys[order[-1]]
    return int(value), order[keys[order] == value].sort().values


def _median_to_first(kv: np.ndarray, ids: np.ndarray) -> None:
    """libstdc++'s __move_median_to_first(first, first + 1, mid, last - 1) for a descending sort."""
    a, b, c = 1, len(kv) // 2, len(kv) - 1
    va, vb, vc = int(kv[a]), int(kv[b]), int(kv[c])
    if va > vb:
        s = b if vb > vc else (c if va > vc else a)
    elif va > vc:
        s = a
    else:
        s = c if vb > vc else b
    for t in (kv, ids):
        t[0], t[s] = t[s], t[0]


def _chunk_counts(stops: np.ndarray) -> np.ndarray:
    """How many stops precede each CHUNK's start, and in all (the last entry)."""
    full = len(stops) // CHUNK * CHUNK
    counts = np.add.reduce(stops[:full].view(np.uint8).reshape(-1, CHUNK), axis=1, dtype=np.int64)
    tail = np.count_nonzero(stops[full:]) if full < len(stops) else None
    counts = counts if tail is None else np.append(counts, tail)
    return np.concatenate([[0], np.cumsum(counts)])


def _ranked(stops: np.ndarray, before: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Positions of the stops of ranks ``[lo, hi)`` (index order)."""
    c0 = int(np.searchsorted(before, lo, side="right")) - 1
    c1 = int(np.searchsorted(before, hi - 1, side="right"))
    found = np.flatnonzero(stops[c0 * CHUNK:c1 * CHUNK])
    skip = lo - int(before[c0])
    return found[skip:skip + hi - lo] + c0 * CHUNK


def _partition(kv: np.ndarray, ids: np.ndarray, pivot: int, stops: np.ndarray) -> int:
    """libstdc++'s __unguarded_partition of ``kv`` (``ids`` moved alike) around ``pivot``, descending (the
    module docstring); returns the cut, an index into ``kv``. ``stops``: (2, len(kv)) booleans to work in."""
    m = len(kv)
    # the stops as the values were before any swap
    left, right = np.less_equal(kv, pivot, out=stops[0]), np.greater_equal(kv, pivot, out=stops[1])
    left_before, right_before = _chunk_counts(left), _chunk_counts(right)
    total_right = int(right_before[-1])
    # #L below p rises with p and #R at or above p falls: min(#L, #R) peaks in the chunk where they cross
    j = int(np.count_nonzero(left_before <= total_right - right_before)) - 1
    lo, hi = j * CHUNK, min((j + 1) * CHUNK, m)
    below = int(left_before[j]) + np.concatenate([[0], np.cumsum(left[lo:hi])])
    at_or_above = total_right - int(right_before[j]) - np.concatenate([[0], np.cumsum(right[lo:hi])])
    swaps = int(np.minimum(below, at_or_above).max())
    cut = int(_ranked(left, left_before, swaps, swaps + 1)[0]) if swaps < int(left_before[-1]) else m
    if swaps == 0:
        return cut
    cut = min(cut, int(_ranked(right, right_before, total_right - swaps, total_right - swaps + 1)[0]))
    for s in range(0, swaps, SWAP_BATCH):
        e = min(s + SWAP_BATCH, swaps)
        lefts = _ranked(left, left_before, s, e)
        rights = _ranked(right, right_before, total_right - e, total_right - s)[::-1]
        for t in (kv, ids):
            t[lefts], t[rights] = t[rights], t[lefts]
    return cut
