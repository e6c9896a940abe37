"""The torch engine's batched LoRA layer (the behaviours every engine shares are in test_engine_contract.py; the
helpers every engine test uses, ``write_random_adapter`` among them, are in tests/support/engine.py)."""

import torch

from ftserve.engine.torch.lora_slots import BatchedLoraLinear, LoraBatch, LoraContext


def test_batched_lora_linear_adds_each_rows_own_adapter():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    context = LoraContext()
    layer = BatchedLoraLinear(base, context, max_loras=3, max_rank=2)
    A0, B0 = torch.zeros(1, 6), torch.zeros(5, 1)
    A0[0, 4], B0[2, 0] = 1.0, 3.0  # slot 0: y[2] += 3 * 2 * x[4] (scale 2)
    A2, B2 = torch.zeros(2, 6), torch.zeros(5, 2)
    A2[1, 0], B2[4, 1] = 1.0, -1.0  # slot 2, rank 2: y[4] -= x[0]
    layer.write(0, A0, B0, 2.0)
    layer.write(2, A2, B2, 1.0)
    x = torch.randn(4, 6)
    context.batch = LoraBatch.for_rows([2, None, 0, 2])
    out = layer(x)
    expected = base(x)
    expected[0, 4] -= x[0, 0]
    expected[3, 4] -= x[3, 0]
    expected[2, 2] += 6 * x[2, 4]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    layer.write(2, None, None)  # cleared: rows of slot 2 now get the base output only
    torch.testing.assert_close(layer(x)[[0, 3]], base(x)[[0, 3]], rtol=0, atol=0)


def test_lora_batch_layout_is_bounded_when_groups_are_skewed():
    batch = LoraBatch.for_rows([0] * 13 + [1, 2, None], by_runs=False)
    assert batch.m == 5 and batch.chunks == 5  # slot 0 cut into 3 chunks of 5; padded rows 25 <= 2 * 15 + 3
    assert sorted(set(batch.gather.tolist())) == list(range(15))
    assert batch.scatter[15] == 25  # the base row reads the zero row past the layout
    assert batch.slot_range is None and batch.slot_index.tolist() == [0, 0, 0, 1, 2]
