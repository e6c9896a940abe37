"""The paged KV cache and prefix caching per adapter (issue 14): first the block pool and the scheduler with no
model, then the engine on tiny Llama (grouped-query attention, sharp attention, so that a wrong key changes
the tokens) and GPT-2 models, every output checked against the request run alone with transformers."""

import asyncio
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from ftserve.cli import main
from ftserve.engine.base import AdapterInfo, GenerationRequest, SamplingParams
from ftserve.engine.torch import TorchEngine
from ftserve.engine.torch.adapter_cache import AdapterCache, AdapterRecord
from ftserve.engine.torch.kernels import LoraBatch
from ftserve.engine.torch.kv_blocks import BlockPool
from ftserve.engine.torch.lora_slots import LoraSlots
from ftserve.engine.torch.scheduler import Scheduler, Sequence
from ftserve.engine.torch.update import update
from ftserve.engine.options import EngineOptions, EngineOptionsError
from ftserve.testing import build_tokenizer, tiny_gpt2, tiny_llama
from support.engine import collect, greedy, references, write_random_adapter

PREFIX = [1] + [(11 * j) % 990 + 5 for j in range(79)]  # 80 tokens: 5 full blocks
SUFFIXES = [[(17 * i + 5 * j) % 990 + 5 for j in range(n)] for i, n in enumerate([7, 19, 3])]


# The options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, means", [("4GiB", 4 * 2 ** 30), ("512MB", 512 * 10 ** 6), ("1000000", 10 ** 6),
                                          ("0.5", 0.5), ("1.0", 1.0), (2 ** 20, 2 ** 20), (0.25, 0.25)])
def test_kv_cache_memory_is_bytes_or_a_fraction_of_the_memory_free(given, means):
    assert EngineOptions(kv_cache_memory=given).kv_cache_memory == means


@pytest.mark.parametrize("given", ["lots", "4 parsecs", "-1", 0, 1.5, True])
def test_a_kv_cache_memory_that_is_neither_is_refused_by_its_flag(given):
    with pytest.raises(EngineOptionsError) as info:
        EngineOptions(kv_cache_memory=given)
    assert info.value.flag == "--kv-cache-memory"


def test_the_cli_refuses_a_kv_cache_memory_it_cannot_read(llama_dir):
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--kv-cache-memory", "lots"])
    assert result.exit_code == 2 and "--kv-cache-memory" in result.output and "'lots'" in result.output



def test_the_test_suites_prefix_caching_switch_reaches_the_engines_pool(llama_dir):
    """conftest.py's FTSERVE_TEST_PREFIX_CACHING=0 must really turn the engine's prefix caching off (and only
    the default: what a test asks for still holds), or the suite's second run tests nothing new."""
    wanted = os.environ.get("FTSERVE_TEST_PREFIX_CACHING", "1") == "1"
    engine = TorchEngine.from_pretrained(llama_dir)
    assert engine.pool.prefix_caching is wanted and engine.options.enable_prefix_caching is wanted
    assert TorchEngine.from_pretrained(llama_dir, enable_prefix_caching=True).pool.prefix_caching is True

# The pool and the scheduler, no model ------------------------------------------------------------------

def make_scheduler(blocks: int, row_blocks: int = 4, max_batch: int = 8, budget: int = 64, caching: bool = True):
    cache = AdapterCache(LoraSlots(torch.nn.Module(), 2, 8), 2, max_cpu_loras=8)
    return Scheduler(cache, max_batch, budget, BlockPool(blocks, row_blocks, caching)), cache


def request(scheduler: Scheduler, prompt: list[int], record=None, max_tokens: int = 4, **params) -> Sequence:
    seq = Sequence(prompt=list(prompt), params=SamplingParams(max_tokens=max_tokens, temperature=0, **params),
                   adapter=record, generator=None, stop_ids=frozenset())
    scheduler.waiting.append(seq)
    return seq


def step(scheduler: Scheduler, token=lambda seq: 7):
    """One step with ``token(seq)`` sampled for every sampled piece; the plan and the emitted items."""
    plan = scheduler.schedule()
    emitted = []
    update(plan, [(plan.owners[i], token(plan.owners[i]), None) for i in plan.sampled], max_len=64,
           emit=lambda seq, item: emitted.append((seq, item)))
    scheduler.retire()
    return plan, emitted


def adapter(cache: AdapterCache, name: str) -> AdapterRecord:
    record = AdapterRecord(info=AdapterInfo(name, f"/adapters/{name}", "lora", 4, 0.0))
    assert cache.put(record, {})
    return record


def test_blocks_follow_the_tokens_and_a_home_row_is_read_in_place():
    scheduler, _ = make_scheduler(blocks=16)
    seq = request(scheduler, range(1, 17), max_tokens=20)  # 16 tokens: one full block
    plan, _ = step(scheduler)
    assert seq.blocks == [0] and seq.home == 0 and seq.in_home and plan.pieces[0].home == 0
    step(scheduler)  # position 16 needs a second block: the next one of its home row
    assert seq.blocks == [0, 1] and seq.in_home and scheduler.pool.used() == 2
    other = request(scheduler, range(1, 4))
    step(scheduler)
    assert other.home == 1 and other.blocks == [4]
    seq.cancelled = True
    scheduler.retire()
    assert scheduler.pool.used() == 1 and scheduler.pool.row_taken == [False, True, False, False]


def test_decodes_are_grouped_by_adapter_slot_so_each_slots_rows_are_one_run():
    """Requests of two adapters and the base admitted interleaved: their decodes come base first, then each
    slot's rows together, so the step's LoRA segments merge into one run per slot (kernels.py gathers no rows)."""
    scheduler, cache = make_scheduler(blocks=32, row_blocks=4)
    a, b = adapter(cache, "a"), adapter(cache, "b")
    seqs = [request(scheduler, range(1, 5), record=record, max_tokens=3) for record in (a, b, None, a, b, None)]
    step(scheduler)  # the prompts, in admission order
    plan, _ = step(scheduler)
    assert plan.decodes == 6 and all(p.home is not None for p in plan.pieces)
    assert [seq.adapter for seq in plan.owners] == [None, None, a, a, b, b]
    assert [(slot, n) for slot, _, n in plan.segments] == [(a.slot, 1)] * 2 + [(b.slot, 1)] * 2
    assert len(LoraBatch(plan.segments, plan.tokens).runs) == 2
    assert {seq.home for seq in seqs} == set(range(6))


def test_a_cached_prefix_brings_its_home_row_when_no_one_holds_it():
    """A request whose cached prefix is the first blocks of a row nobody holds takes that row as its home (its
    decodes read the cache in place); while the request that computed them still runs, it reads through its
    block table."""
    scheduler, _ = make_scheduler(blocks=16)
    prompt = list(range(1, 34))  # 33 tokens: two full blocks, named once computed
    first = request(scheduler, prompt, max_tokens=1)
    step(scheduler)
    assert first.finished and first.home is None and scheduler.pool.row_taken == [False] * 4
    again = request(scheduler, prompt, max_tokens=3)
    plan, _ = step(scheduler)
    assert again.blocks[:2] == [0, 1] and again.home == 0 and again.in_home
    assert plan.pieces[0].start == 32 and plan.pieces[0].home == 0
    plan, _ = step(scheduler)  # its decode: in its home row
    assert plan.pieces[0].home == 0 and again.blocks == [0, 1, 2]
    beside = request(scheduler, prompt, max_tokens=3)  # the same prefix while its row is held
    plan, _ = step(scheduler)
    assert beside.blocks[:2] == [0, 1] and beside.home is None and not beside.in_home
    assert [p.home for p in plan.pieces] == [0, None]


def test_the_newest_request_is_preempted_by_recomputation_and_continues_without_losing_or_repeating_tokens():
    """Two requests in a 3-block pool (one of 4-block rows is too few: the pool's one row needs 4 blocks, so
    row_blocks 2 here): when the oldest needs a block, the newest goes back to the queue, prefills its prompt and
    its output so far again, and samples on from there."""
    scheduler, _ = make_scheduler(blocks=3, row_blocks=2, budget=64, caching=False)
    counter = iter(range(100, 200))
    old = request(scheduler, range(1, 15), max_tokens=10)   # 14 tokens: 1 block, a second at position 16
    new = request(scheduler, range(1, 12), max_tokens=10)   # 11 tokens: 1 block, a second at position 16
    emitted = []
    for _ in range(40):
        if not scheduler.running and not scheduler.waiting:
            break
        emitted += step(scheduler, token=lambda seq: next(counter))[1]
    assert scheduler.pool.preemptions >= 1
    for seq in (old, new):
        tokens = [t for s, item in emitted if s is seq for t in item.token_ids]
        assert tokens == seq.output and len(tokens) == 10  # every token emitted once, in order
        assert emitted[[s for s, _ in emitted].index(seq)][1].completion_tokens == 1
    assert scheduler.pool.used() == 0


def test_a_recomputed_request_prefills_its_prompt_and_output_and_samples_its_next_token():
    scheduler, _ = make_scheduler(blocks=3, row_blocks=2, caching=False)
    seq = request(scheduler, range(1, 6), max_tokens=10)
    step(scheduler), step(scheduler)
    assert seq.output == [7, 7] and seq.cached == 6
    scheduler._preempt(seq)
    plan, emitted = step(scheduler, token=lambda s: 9)
    assert [(p.start, p.tokens, p.logits) for p in plan.pieces] == [(0, [1, 2, 3, 4, 5, 7, 7], "last")]
    assert seq.output == [7, 7, 9] and [item.token_ids for _, item in emitted] == [[9]]
    plan, _ = step(scheduler)
    assert [(p.start, p.tokens) for p in plan.pieces] == [(7, [9])]


def test_prefix_blocks_are_named_per_adapter_and_reused_only_under_the_same_one():
    scheduler, cache = make_scheduler(blocks=64, row_blocks=8, budget=200)
    a, b = adapter(cache, "a"), adapter(cache, "b")
    prompt = PREFIX + SUFFIXES[0]
    first = request(scheduler, prompt, a, max_tokens=1)
    while not first.finished:
        step(scheduler)
    pool = scheduler.pool
    assert (pool.queries, pool.hits) == (87, 0)
    for record, hit in ((b, 0), (None, 0), (a, 80)):
        seq = request(scheduler, prompt, record, max_tokens=1)
        plan, _ = step(scheduler)
        assert seq.cached == len(prompt) and plan.pieces[-1].start == hit, record
        assert pool.hits == 80 if hit else pool.hits == 0
    request(scheduler, prompt, a, max_tokens=1, prompt_logprobs=0)  # computes every prompt token itself
    plan, _ = step(scheduler)
    assert plan.pieces[-1].start == 0 and pool.queries == 4 * 87 and pool.hits == 80


def test_a_whole_cached_prompt_still_computes_its_last_token():
    scheduler, _ = make_scheduler(blocks=64, row_blocks=8, budget=200)
    prompt = PREFIX  # exactly 5 blocks: only 4 may be taken, the last block is computed to sample from
    for expected_start in (0, 64):
        seq = request(scheduler, prompt, max_tokens=1)
        plan, _ = step(scheduler)
        assert plan.pieces[-1].start == expected_start and seq.finished


class Table:
    """A block table alone, as a Sequence carries it."""

    def __init__(self) -> None:
        self.blocks, self.hashes, self.home, self.in_home = [], [], None, False


def test_named_blocks_are_evicted_least_recently_freed_first_and_forgotten_when_their_adapter_goes():
    pool = BlockPool(8, 8)  # one row; tables without a home take the highest free block first
    one, two = Table(), Table()
    assert pool.grow(one, 32) and pool.grow(two, 32) and one.blocks == [7, 6] and two.blocks == [5, 4]
    pool.commit(one, list(range(32)), 32, adapter_key=1)
    pool.commit(two, list(range(100, 132)), 32, adapter_key=2)
    pool.release(two), pool.release(one)  # freed tail first: 4, 5, then 6, 7
    assert list(pool.evictable) == [4, 5, 6, 7] and pool.available() == 8 and pool.used() == 0
    three = Table()
    assert pool.grow(three, 5 * 16) and three.blocks == [3, 2, 1, 0, 4]  # the free ones, then the oldest named
    assert list(pool.evictable) == [5, 6, 7]
    assert not pool.grow(three, 9 * 16) and len(three.blocks) == 5  # nothing taken when the pool is short
    hit = Table()
    assert pool.lookup(hit, list(range(32)) + [0], adapter_key=1) == 32 and hit.blocks == [7, 6]
    again = Table()
    assert pool.lookup(again, list(range(100, 132)) + [0], adapter_key=2) == 16  # its tail went first, not its head
    pool.release(hit), pool.release(again)
    assert pool.invalidate(1) == 2 and pool.lookup(Table(), list(range(32)) + [0], adapter_key=1) == 0
    assert pool.invalidate(2) == 1 and not pool.named and pool.available() == 3


# The engine ---------------------------------------------------------------------------------------------

def sharp(model):
    """Larger query and key weights: attention that depends on which keys a query sees."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                param.mul_(6)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    paths = {}
    for kind, model in (("llama", tiny_llama(kv_heads=2)), ("gpt2", tiny_gpt2())):
        paths[kind] = root / kind
        sharp(model).save_pretrained(paths[kind])
        build_tokenizer(model.config.vocab_size).save_pretrained(paths[kind])
    return paths


@pytest.fixture(scope="module")
def loras(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("paged_loras")
    return {(kind, name): write_random_adapter(bases[kind], root / f"{kind}_{name}", "lora", seed=seed)
            for kind in bases for seed, name in enumerate("ab")}


async def serve(base, adapters: dict, requests: list, **options):
    """Every ``(adapter, prompt, max_tokens)`` at once; their token ids, and the engine's stats."""
    async with TorchEngine.from_pretrained(base, **options) as engine:
        for name, path in adapters.items():
            await engine.load_adapter(name, str(path))
        outs = await asyncio.gather(*[collect(engine, GenerationRequest(p, adapter=a, params=greedy(n)))
                                      for a, p, n in requests])
        return [ids for ids, _, _ in outs], engine.stats()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("caching", [True, False])
def test_mixed_adapters_sharing_a_prefix_each_get_their_own_adapters_tokens(bases, loras, kind, caching):
    """Base, a and b on prompts that share a 5-block prefix, in chunks of 24 tokens beside decodes, twice: the
    second round finds the prefix cached (per adapter) and every output still equals its solo run."""
    adapters = {name: loras[kind, name] for name in "ab"}
    prompts = [PREFIX + s for s in SUFFIXES]
    expected = {name: references(bases[kind], adapters.get(name), prompts, new=6) for name in (None, "a", "b")}
    assert expected["a"] != expected["b"] != expected[None]
    requests = [(name, p, 6) for name in (None, "a", "b") for p in prompts]

    async def main():
        async with TorchEngine.from_pretrained(bases[kind], max_num_batched_tokens=24, max_batch_size=4,
                                               enable_prefix_caching=caching) as engine:
            for name, path in adapters.items():
                await engine.load_adapter(name, str(path))
            rounds = []
            for _ in range(2):
                outs = await asyncio.gather(*[collect(engine, GenerationRequest(p, adapter=a, params=greedy(n)))
                                              for a, p, n in requests])
                rounds.append([ids for ids, _, _ in outs])
            return rounds, engine.stats()

    rounds, stats = asyncio.run(main())
    for outs in rounds:
        assert outs == [expected[name][i] for name in (None, "a", "b") for i in range(len(prompts))]
    assert (stats["prefix_cache_hits_total"] >= 9 * 64) == caching  # every request of round 2 at least
    assert stats["kv_blocks_used"] == 0


def test_a_cache_too_small_for_all_requests_finishes_every_one_as_a_big_cache_does(bases, loras):
    """Twelve requests of up to 47 + 40 tokens in a cache of 40 blocks (one request of max_model_len 512 needs
    32): requests are preempted and recomputed, and each one's tokens equal its solo run, none sent twice."""
    adapters = {name: loras["llama", name] for name in "ab"}
    prompts = [PREFIX[:20 + 9 * i] + SUFFIXES[i % 3] for i in range(4)]
    requests = [(name, p, 40) for name in (None, "a", "b") for p in prompts]
    block_bytes = 2 * 2 * 2 * 32 * 4 * 16  # K and V, 2 layers, 2 K/V heads of 32, fp32, 16 positions
    small, stats = asyncio.run(serve(bases["llama"], adapters, requests, max_batch_size=12,
                                     kv_cache_memory=40 * block_bytes))
    big, big_stats = asyncio.run(serve(bases["llama"], adapters, requests, max_batch_size=12))
    assert stats["kv_blocks_free"] == 40 and stats["preemptions_total"] > 0 and big_stats["preemptions_total"] == 0
    assert small == big and all(len(ids) == 40 for ids in small)
    assert small == [references(bases["llama"], adapters.get(name), prompts, new=40)[i]
                     for name in (None, "a", "b") for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_second_of_two_requests_sharing_five_blocks_prefills_only_the_rest(bases, kind):
    """Its tokens equal a cold run's; a request asking for prompt log probabilities computes the whole prompt
    and its log probabilities equal a cold engine's."""
    first, second = PREFIX + SUFFIXES[0], PREFIX + SUFFIXES[1]
    logprobs = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=3)

    async def main(warm: bool):
        async with TorchEngine.from_pretrained(bases[kind], enable_prefix_caching=True) as engine:
            if warm:
                await collect(engine, GenerationRequest(first, params=greedy(5)))
            before = engine.stats()
            ids, _, _ = await collect(engine, GenerationRequest(second, params=greedy(5)))
            middle = engine.stats()
            chunks = [c async for c in engine.generate(GenerationRequest(second, params=logprobs))]
            after = engine.stats()
            return ids, chunks, before, middle, after

    warm_ids, warm_chunks, before, middle, after = asyncio.run(main(True))
    cold_ids, cold_chunks, *_ = asyncio.run(main(False))
    assert warm_ids == cold_ids == references(bases[kind], None, [second], new=5)[0]
    assert middle["prefill_tokens_total"] - before["prefill_tokens_total"] == len(second) - 80
    assert middle["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == 80
    assert after["prefill_tokens_total"] - middle["prefill_tokens_total"] == len(second)
    assert [t for c in warm_chunks for t in c.token_ids] == cold_ids
    warm_lp, cold_lp = warm_chunks[0].prompt_logprobs, cold_chunks[0].prompt_logprobs
    assert len(warm_lp) == len(second) and warm_lp[0] is None
    for w, c in zip(warm_lp[1:], cold_lp[1:]):
        assert (w.token_id, w.rank, [t for t, _ in w.top]) == (c.token_id, c.rank, [t for t, _ in c.top])
        torch.testing.assert_close(w.logprob, c.logprob, atol=1e-5, rtol=1e-5)


def test_an_adapter_loaded_again_under_its_name_with_other_weights_never_reuses_the_old_blocks(bases, loras):
    prompt = PREFIX + SUFFIXES[1]
    paths = [loras["llama", "a"], loras["llama", "b"]]
    expected = [references(bases["llama"], path, [prompt], new=6)[0] for path in paths]

    async def main():
        async with TorchEngine.from_pretrained(bases["llama"]) as engine:
            outs = []
            for path in paths:
                await engine.load_adapter("x", str(path))
                outs.append((await collect(engine, GenerationRequest(prompt, adapter="x", params=greedy(6))))[0])
                await engine.unload_adapter("x")
            return outs, engine.stats()

    outs, stats = asyncio.run(main())
    assert outs == expected and stats["prefix_cache_hits_total"] == 0


def test_the_blocks_of_a_request_whose_scores_overflowed_are_wiped_before_others_reuse_them(bases, loras, tmp_path):
    """An adapter with huge factors writes NaN or infinity into its request's K/V; in a cache of 34 blocks the
    requests after it take the same blocks, and a NaN even in a masked-out position would spoil their rows."""
    from safetensors.torch import load_file, save_file

    from ftserve.engine.errors import GenerationError

    huge = tmp_path / "huge"
    shutil.copytree(loras["llama", "a"], huge)
    weights = huge / "adapter_model.safetensors"
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    spoilt = [(PREFIX * 7)[:500]]  # the 32 blocks of the home row, positions 0 .. 499
    # The first request takes the home row again; the others spill to the highest blocks: the 34-token one's
    # third block is block 31, whose positions 496 .. 499 the spoilt request wrote, and it reads them (masked
    # out, as its positions 34 .. 35) beside the 60-token one.
    prompts = [PREFIX[:33], PREFIX[10:44], PREFIX[20:80]]
    expected = references(bases["llama"], None, prompts, new=8)
    block_bytes = 2 * 2 * 2 * 32 * 4 * 16

    async def main():
        async with TorchEngine.from_pretrained(bases["llama"], kv_cache_memory=34 * block_bytes) as engine:
            await engine.load_adapter("huge", str(huge))
            failures = await asyncio.gather(*[collect(engine, GenerationRequest(p, adapter="huge", params=greedy(8)))
                                              for p in spoilt], return_exceptions=True)
            outs = await asyncio.gather(*[collect(engine, GenerationRequest(p, params=greedy(8))) for p in prompts])
            return failures, [ids for ids, _, _ in outs]

    failures, outs = asyncio.run(main())
    assert all(isinstance(f, GenerationError) for f in failures)
    assert outs == expected
