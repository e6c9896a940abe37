"""What every engine in ``ENGINES`` must do, written once: each test runs over every engine, so the next
engine inherits them. Torch-only behaviour (slots, KV cache, the scheduler) stays in the other engine tests.
"""

import asyncio

import pytest

from ftserve.engine import ENGINES, create_engine, engine_factory
from ftserve.engine.base import STATS_KEYS, GenerationRequest
from ftserve.engine.errors import EngineClosedError, EngineUnavailableError
from ftserve.engine.options import EngineOptions, EngineOptionsError
from test_engine import collect, greedy

PROMPT = [1, 5, 6, 7, 8, 9]


@pytest.fixture(params=sorted(ENGINES))
def kind(request):
    return request.param


def build(kind: str, base, **options):
    """An engine of ``kind`` on ``base``; on CPU where the engine can run there, so the references match."""
    return create_engine(kind, str(base), EngineOptions(device="cpu", dtype="float32", **options))


def test_stats_have_exactly_the_contract_keys(kind, llama_dir):
    async def main():
        async with build(kind, llama_dir) as engine:
            before = engine.stats()
            await collect(engine, GenerationRequest(PROMPT, params=greedy(3)))
            return before, engine.stats()

    before, after = asyncio.run(main())
    assert tuple(sorted(before)) == tuple(sorted(STATS_KEYS)) and set(after) == set(STATS_KEYS)
    assert all(isinstance(v, float) for v in after.values())
    assert after["finished_requests_total"] == before["finished_requests_total"] + 1
    assert after["generated_tokens_total"] >= before["generated_tokens_total"] + 3


def test_health_is_lost_on_shutdown_and_then_requests_are_refused(kind, llama_dir):
    async def main():
        engine = build(kind, llama_dir)
        await engine.start()
        alive = engine.healthy()
        await engine.shutdown()
        with pytest.raises(EngineClosedError):
            engine.generate(GenerationRequest(PROMPT, params=greedy(2)))
        return alive, engine.healthy()

    assert asyncio.run(main()) == (True, False)


def test_the_served_name_is_the_option_or_the_folder(kind, llama_dir):
    assert build(kind, llama_dir).model_name == llama_dir.name
    assert build(kind, llama_dir, served_model_name="tiny").model_name == "tiny"


@pytest.mark.parametrize("options, flag, words", [
    (dict(max_num_seqs=16, max_num_batched_tokens=16), "--max-num-batched-tokens", "> --max-num-seqs (16)"),
    (dict(max_loras=4, max_cpu_loras=2), "--max-cpu-loras", ">= --max-loras (4)"),
    (dict(max_num_seqs=0), "--max-num-seqs", "integer >= 1; got 0"),
    (dict(max_queue=1.5), "--max-queue", "integer >= 1; got 1.5"),
    (dict(dtype="int8"), "--dtype", "one of auto"),
])
def test_options_are_checked_once_in_the_flags_words(options, flag, words):
    with pytest.raises(EngineOptionsError) as info:
        EngineOptions(**options)
    assert info.value.flag == flag and words in info.value.reason and isinstance(info.value, ValueError)


def test_an_engine_not_in_this_version_is_refused_by_name():
    with pytest.raises(EngineUnavailableError, match="--engine vllm is not available"):
        engine_factory("vllm")
    with pytest.raises(EngineUnavailableError, match="no engine named 'tgi'"):
        create_engine("tgi", "base")
