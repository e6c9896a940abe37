"""The scheduler's step plans, with no model: plain Sequence objects, the real adapter cache over slots that
hold no layers, and update.py applying hand-chosen tokens. Decodes come first, then prompt chunks under the
token budget, then admissions FIFO while rows, budget and adapter slots last; a request blocked on a slot is
passed for STARVATION_STEPS steps only."""

import torch

from ftserve.engine.base import AdapterInfo, SamplingParams
from ftserve.engine.torch.adapter_cache import AdapterCache, AdapterRecord
from ftserve.engine.torch.kv_blocks import BlockPool
from ftserve.engine.torch.lora_slots import LoraSlots
from ftserve.engine.torch.scheduler import STARVATION_STEPS, Scheduler, Sequence
from ftserve.engine.torch.update import update


def make_scheduler(max_batch=4, max_batched_tokens=8, max_loras=2):
    cache = AdapterCache(LoraSlots(torch.nn.Module(), max_loras, 8), max_loras, max_cpu_loras=8)
    return Scheduler(cache, max_batch, max_batched_tokens, BlockPool(max_batch * 8, 8)), cache


def adapter(cache: AdapterCache, name: str) -> AdapterRecord:
    record = AdapterRecord(info=AdapterInfo(name, f"/adapters/{name}", "lora", 4, 0.0))
    assert cache.put(record, {})  # no layers to fill: the slot bookkeeping is all that is planned with
    return record


def request(scheduler: Scheduler, length: int, record: AdapterRecord | None = None, max_tokens: int = 4) -> Sequence:
    prompt = list(range(1, length + 1))
    seq = Sequence(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0), adapter=record,
                   generator=None, stop_ids=frozenset())
    scheduler.waiting.append(seq)
    return seq


def run(plan, token=7):
    """What the engine does after the runner: every sampled piece gets ``token``; the emitted items."""
    emitted = []
    update(plan, [(plan.owners[i], token, None) for i in plan.sampled], max_len=100,
           emit=lambda seq, item: emitted.append((seq, item)))
    return emitted


def layout(plan, scheduler):
    """Each piece as (its request's place in the running list, start, tokens, logits)."""
    return [(scheduler.running.index(seq), p.start, len(p.tokens), p.logits) for p, seq in zip(plan.pieces, plan.owners)]


def test_decodes_first_then_prompt_chunks_then_admissions_under_the_token_budget():
    scheduler, _ = make_scheduler(max_batched_tokens=8)
    short, long = request(scheduler, 3), request(scheduler, 10)
    plan = scheduler.schedule()
    assert plan.admitted == [short, long] and scheduler.running == [short, long]
    assert layout(plan, scheduler) == [(0, 0, 3, "last"), (1, 0, 5, "none")]  # the long prompt is cut at the budget
    assert plan.sampled == [0] and plan.decodes == 0 and plan.prefill_tokens == 8
    assert [(seq, item.token_ids) for seq, item in run(plan)] == [(short, [7])]

    late = request(scheduler, 4)
    plan = scheduler.schedule()
    # one decode, the long prompt's last 5 tokens, and 2 of the 4 of the newcomer's (1 + 5 + 2 = 8)
    assert layout(plan, scheduler) == [(0, 3, 1, "last"), (1, 5, 5, "last"), (2, 0, 2, "none")]
    assert plan.admitted == [late] and plan.sampled == [0, 1] and plan.decodes == 1
    run(plan)
    assert (short.output, long.output, late.output, late.cached) == ([7, 7], [7], [], 2)


def test_admission_is_fifo_while_rows_and_budget_last():
    scheduler, _ = make_scheduler(max_batch=2, max_batched_tokens=100)
    first, second, third = (request(scheduler, 3) for _ in range(3))
    assert scheduler.schedule().admitted == [first, second]  # two rows
    assert list(scheduler.waiting) == [third]

    scheduler, _ = make_scheduler(max_batch=4, max_batched_tokens=8)
    big, small = request(scheduler, 8), request(scheduler, 1)
    plan = scheduler.schedule()
    assert plan.admitted == [big] and list(scheduler.waiting) == [small]  # the budget is spent, no passing


def test_cancelled_waiting_requests_are_dropped_and_retired_requests_give_back_blocks_and_slots():
    scheduler, cache = make_scheduler(max_batch=4, max_batched_tokens=100)
    record = adapter(cache, "a")
    gone = request(scheduler, 2)
    gone.cancelled = True
    rows = [request(scheduler, 2), request(scheduler, 2, record), request(scheduler, 2)]
    assert scheduler.schedule().admitted == rows and not scheduler.waiting
    assert [s.slot for s in rows] == [None, 0, None] and cache.slot_rows == [1, 0]
    assert [s.blocks for s in rows] == [[0], [8], [16]] and scheduler.pool.used() == 3  # each in its home row
    rows[1].cancelled = True
    assert scheduler.retire() == [rows[1]] and scheduler.running == [rows[0], rows[2]]
    assert cache.slot_rows == [0, 0] and rows[1].blocks == [] and scheduler.pool.used() == 2


def test_segments_give_each_adapted_piece_its_slot():
    scheduler, cache = make_scheduler(max_batch=4, max_batched_tokens=100)
    a, b = adapter(cache, "a"), adapter(cache, "b")
    request(scheduler, 3, a), request(scheduler, 2), request(scheduler, 4, b)
    assert scheduler.schedule().segments == [(0, 0, 3), (1, 5, 4)]


def test_a_request_blocked_on_adapter_slots_is_passed_for_starvation_steps_only():
    """With the only slot held by `a`, new requests for `a` pass the waiting request for `b` for
    STARVATION_STEPS steps, then no longer; once `a`'s rows drain, `b` goes first."""
    scheduler, cache = make_scheduler(max_batch=64, max_batched_tokens=1000, max_loras=1)
    a, b = adapter(cache, "a"), adapter(cache, "b")
    first = request(scheduler, 3, a)
    assert scheduler.schedule().admitted == [first]
    blocked = request(scheduler, 3, b)
    passed = []
    for _ in range(STARVATION_STEPS + 3):
        newest = request(scheduler, 3, a)
        passed.append(scheduler.schedule().admitted == [newest])
    assert passed == [True] * STARVATION_STEPS + [False] * 3
    assert blocked in scheduler.waiting and len(scheduler.waiting) == 4
    for seq in scheduler.running:  # `a`'s rows finish
        seq.finished = True
    scheduler.retire()
    assert scheduler.schedule().admitted[0] is blocked
