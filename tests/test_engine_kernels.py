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


def per_row_reference(x, row_slots, A, Bt, ranks):
    """Each row's own ``B_a (A_a x)`` on that adapter's rank, zero for the base model."""
    out = torch.zeros(x.shape[0], Bt.shape[-1], dtype=torch.float64)
    for i, slot in enumerate(row_slots):
        if slot is not None:
            r = ranks[slot]
            out[i] = (x[i].double() @ A[slot, :r].double().T) @ Bt[slot, :r].double()
    return out


def random_slots(ranks, d_in=7, d_out=5, seed=0):
    """Stacked factors with each slot's own rank, zero past it (as lora_slots.py writes them)."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.zeros(len(ranks), max(ranks), d_in)
    Bt = torch.zeros(len(ranks), max(ranks), d_out)
    for slot, r in enumerate(ranks):
        A[slot, :r] = torch.randn(r, d_in, generator=generator)
        Bt[slot, :r] = torch.randn(r, d_out, generator=generator)
    return A, Bt


LAYOUTS = [
    [0, 0, 0, 1, 1, 2],  # contiguous runs
    [2, None, 0, 2, 1, None, 0, 0],  # mixed slots, base rows interleaved
    [None, 1, 1, 1, 1, None],  # one slot between base rows
    [1] * 9,  # one run over every row
    [3],  # one row
    [None, None],  # base rows only
    [],  # no rows at all
]


@pytest.mark.parametrize("by_runs", [True, False, None])
@pytest.mark.parametrize("row_slots", LAYOUTS)
def test_both_paths_match_each_rows_own_term_and_add_in_place(row_slots, by_runs):
    ranks = [2, 4, 1, 3]  # ranks differ per slot; the batch reads the largest, zero rows past each own
    A, Bt = random_slots(ranks)
    x = torch.randn(len(row_slots), 7, generator=torch.Generator().manual_seed(1))
    batch = LoraBatch.for_rows(row_slots, by_runs=by_runs)
    rank = max([ranks[s] for s in batch.slots], default=1)
    expected = per_row_reference(x, row_slots, A, Bt, ranks)
    torch.testing.assert_close(lora_delta(x, batch, A, Bt, rank).double(), expected, rtol=1e-5, atol=1e-5)
    out = torch.randn(len(row_slots), 5, generator=torch.Generator().manual_seed(2))
    before = out.clone()
    returned = lora_delta(x, batch, A, Bt, rank, out)
    assert returned.data_ptr() == out.data_ptr()  # added into the base output, no new tensor
    torch.testing.assert_close(out.double(), before.double() + expected, rtol=1e-5, atol=1e-5)


def test_segments_merge_into_runs_and_the_rule_picks_the_path():
    batch = LoraBatch([(0, 0, 3), (0, 3, 2), (1, 5, 0), (1, 6, 4)], rows=10)
    assert batch.runs == [(0, 0, 5), (1, 6, 10)] and batch.by_runs and batch.whole is None
    decode = LoraBatch.for_rows([i % 8 for i in range(32)])  # 32 one-row runs: the padded layout
    assert not decode.by_runs and decode.chunks == 8
    prefill = LoraBatch([(i % 8, 128 * i, 128) for i in range(32)], rows=32 * 128)  # long runs, one by one
    assert prefill.by_runs
    assert LoraBatch([(2, 0, 4), (2, 4, 4)], rows=8).whole == 2


@pytest.mark.parametrize("conv1d", [False, True])
def test_one_slot_over_many_rows_runs_on_a_merged_weight(conv1d):
    """Enough rows of one slot: the layer runs the base on ``W + Bt^T A``, equal to base plus the term."""
    from transformers.pytorch_utils import Conv1D

    from ftserve.engine.torch.lora_slots import BatchedLoraLinear, LoraContext

    torch.manual_seed(0)
    base = Conv1D(5, 7) if conv1d else torch.nn.Linear(7, 5)
    context = LoraContext()
    layer = BatchedLoraLinear(base, context, max_loras=2, max_rank=3)
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    layer.write(1, A, B, 0.5)
    rows = layer.merge_rows + 1
    x = torch.randn(2, rows, 7)
    context.batch = LoraBatch([(1, 0, 2 * rows)], rows=2 * rows)
    assert context.batch.whole == 1
    expected = base(x).double() + 0.5 * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def scaled_layer(conv1d: bool, dtype: torch.dtype = torch.float32):
    """A layer with a bias and three slots: 0 plain, 1 and 2 row-scaled, each with its own factors and scale;
    the dense reference of each slot: ``r * (W x + s B A x) + b``, r = 1 for the plain slot. In bfloat16 the
    slots hold bfloat16 factors and float32 row scales."""
    from transformers.pytorch_utils import Conv1D

    from ftserve.engine.torch.lora_slots import BatchedLoraLinear, LoraContext

    generator = torch.Generator().manual_seed(3)
    base = Conv1D(5, 7) if conv1d else torch.nn.Linear(7, 5)
    with torch.no_grad():
        base.bias.copy_(torch.randn(5, generator=generator))  # Conv1D starts at zero, which would hide the shift
    base.to(dtype)
    context = LoraContext()
    layer = BatchedLoraLinear(base, context, max_loras=3, max_rank=3)
    W = base.weight.T if conv1d else base.weight
    reference = {None: lambda x: x.double() @ W.double().T + base.bias.double()}
    for slot, (rank, scale, row_scaled) in enumerate([(2, 0.5, False), (3, 2.0, True), (1, 1.5, True)]):
        A, B = torch.randn(rank, 7, generator=generator), torch.randn(5, rank, generator=generator)
        r = torch.rand(5, generator=generator) + 0.5 if row_scaled else None
        layer.write(slot, A, B, scale, row_scale=r)

        A = A.to(dtype).float()  # what the slot holds

        def dense(x, A=A, B=B, scale=scale, r=r):
            unbiased = x.double() @ W.double().T + scale * (x.double() @ A.double().T) @ B.double().T
            return (unbiased if r is None else r.double() * unbiased) + base.bias.double()

        reference[slot] = dense
    return layer, context, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("by_runs", [True, False])
@pytest.mark.parametrize("row_slots", [
    [1, 0, None, 1, 2, 0, None, 2, 1],  # scaled, plain and base rows interleaved
    [0, 0, None, 0],  # no scaled slot in the batch: no scale applied anywhere
    [None, 2, 2, 2],  # one scaled slot between base rows
    [0, 0, 1, 1, 2, 2],  # padded, the layout is the activation itself: scaled per chunk, without gathers
])
def test_row_scaled_slots_scale_their_rows_and_leave_plain_and_base_rows_alone(row_slots, by_runs, conv1d, dtype):
    from ftserve.engine.torch.kernels import LoraBatch

    layer, context, reference = scaled_layer(conv1d, dtype)
    x = torch.randn(len(row_slots), 7, generator=torch.Generator().manual_seed(4)).to(dtype)
    context.batch = LoraBatch.for_rows(row_slots, by_runs=by_runs)
    expected = torch.stack([reference[slot](x[i]) for i, slot in enumerate(row_slots)])
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)
    torch.testing.assert_close(y.double(), expected, **tolerance)


@pytest.mark.parametrize("conv1d", [False, True])
def test_a_row_scaled_slot_over_many_rows_runs_on_its_scaled_merged_weight(conv1d):
    """``diag(r) (W + Bt^T A)`` with the bias untouched, equal to the dense reference; and a slot written
    again with a plain adapter loses its scale."""
    from ftserve.engine.torch.kernels import LoraBatch

    layer, context, reference = scaled_layer(conv1d)
    rows = layer.merge_rows + 1
    x = torch.randn(rows, 7, generator=torch.Generator().manual_seed(5))
    context.batch = LoraBatch([(1, 0, rows)], rows=rows)
    assert context.batch.whole == 1
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference[1](x), rtol=1e-5, atol=1e-5)
        A, B = torch.randn(2, 7), torch.randn(5, 2)
        layer.write(1, A, B, 1.0)
        plain = x.double() @ (layer.base_layer.weight.T if conv1d else layer.base_layer.weight).double().T
        plain += (x.double() @ A.double().T) @ B.double().T + layer.base_layer.bias.double()
        torch.testing.assert_close(layer(x).double(), plain, rtol=1e-5, atol=1e-5)
    assert layer.scaled == {2}
