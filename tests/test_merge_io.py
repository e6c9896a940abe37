"""Merge, writing: the per-block finiteness check and the output files, on their own."""

import pytest
import torch

from ftserve.merge.write import all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    # every position of lengths around the vector widths: a reduction's head, body and tail
    for n in (1, 7, 8, 9, 31, 32, 33, 257):
        assert all_finite(torch.randn(n).to(dtype))
        for i in range(n):
            x = torch.randn(n).to(dtype)
            x[i] = bad
            assert not all_finite(x), (n, i)
            assert not all_finite(x.view(1, n).expand(3, n).contiguous())


def test_all_finite_of_extremes_and_empty():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        info = torch.finfo(dtype)
        assert all_finite(torch.tensor([info.max, -info.max, info.tiny, 0.0], dtype=dtype))
    assert all_finite(torch.empty(0, 4))
