"""mergekit's tie-break at a top-k cut (ftserve.merge.introsort) against torch's own CPU sort, the oracle: the
ties kept are those ``torch.argsort(keys, descending=True)[:k]`` keeps, whatever the size, the number of
distinct keys and k."""

import pytest
import torch

from ftserve.merge import introsort
from ftserve.merge.introsort import kept_at_cut


def sorts_choice(keys: torch.Tensor, k: int) -> tuple[int, torch.Tensor]:
    order = torch.argsort(keys, descending=True)[:k]
    value = keys[order[-1]]
    return int(value), order[keys[order] == value].sort().values


def cases(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(17, 20000, (1,), generator=g))
        distinct = [2, 3, 10, 100, 30000][int(torch.randint(0, 5, (1,), generator=g))]
        dtype = torch.int16 if int(torch.randint(0, 2, (1,), generator=g)) else torch.int32
        keys = torch.randint(0, distinct, (n,), generator=g, dtype=dtype)
        yield keys, int(torch.randint(1, n, (1,), generator=g))


@pytest.mark.parametrize("chunk, batch", [(2**16, 2**20), (4, 3), (64, 50)])
def test_keeps_the_ties_torchs_sort_keeps(chunk, batch, monkeypatch):
    """Small chunks and swap batches make each partition count and swap across many of them."""
    monkeypatch.setattr(introsort, "CHUNK", chunk)
    monkeypatch.setattr(introsort, "SWAP_BATCH", batch)
    for keys, k in cases(150, chunk):
        value, kept = kept_at_cut(keys.clone(), k)
        expected_value, expected = sorts_choice(keys, k)
        assert value == expected_value and torch.equal(kept, expected), (len(keys), k)


def test_segments_of_at_most_sixteen_are_not_partitioned():
    """Introsort leaves 16 elements to its insertion sort (stable): all ties, the first k in index order."""
    keys = torch.zeros(16, dtype=torch.int16)
    assert torch.equal(kept_at_cut(keys.clone(), 5)[1], torch.arange(5))
    assert torch.equal(kept_at_cut(keys.clone(), 5)[1], sorts_choice(keys, 5)[1])


def test_where_introsort_turns_to_heapsort_the_tensor_is_sorted_as_torch_sorts_it(monkeypatch):
    monkeypatch.setattr(introsort, "depth_limit", lambda n: 1)
    for keys, k in cases(20, 1):
        value, kept = kept_at_cut(keys.clone(), k)
        assert (value, kept.tolist()) == (sorts_choice(keys, k)[0], sorts_choice(keys, k)[1].tolist())


def test_k_outside_the_tensor_is_refused():
    with pytest.raises(ValueError, match="outside"):
        kept_at_cut(torch.zeros(20, dtype=torch.int16), 20)
