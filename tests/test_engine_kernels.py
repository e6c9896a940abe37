"""The batched LoRA kernel (kernels.py) against each row's own ``B (A x)``, with hand-placed factors."""

import pytest
import torch

from ftserve.engine.torch.kernels import LoraBatch, lora_delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_groups_in_bfloat16_do_not_mix_dtypes(dtype):
    """Uneven groups pad the layout, and the padding mask is float32: in bfloat16 it once turned the hidden
    term into float32 and the second matmul failed. Rows: slot 0 three times, slot 1 once, the base once."""
    A = torch.zeros(2, 2, 3, dtype=dtype)
    Bt = torch.zeros(2, 2, 4, dtype=dtype)
    A[0, 0, 0] = 1  # slot 0: delta = 2 * x[0] on output 1
    Bt[0, 0, 1] = 2
    A[1, 1, 2] = 1  # slot 1: delta = 3 * x[2] on output 3
    Bt[1, 1, 3] = 3
    x = torch.arange(15, dtype=dtype).view(5, 3)
    batch = LoraBatch.for_rows([0, 0, None, 0, 1], by_runs=False)
    assert batch.padded
    delta = lora_delta(x, batch, A, Bt, rank=2)
    expected = torch.zeros(5, 4, dtype=dtype)
    for row in (0, 1, 3):
        expected[row, 1] = 2 * x[row, 0]
    expected[4, 3] = 3 * x[4, 2]
    assert delta.dtype == dtype
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)
