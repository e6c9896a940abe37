"""Bad input fails that request alone, with a typed error that says what was wrong; requests in flight finish."""

import asyncio
import shutil

import pytest

from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.engine.errors import (AdapterExistsError, AdapterLoadError, ContextLengthError, GenerationError,
                                   QueueFullError, RequestError, UnknownAdapterError)
from ftserve.engine.torch import TorchEngine
from ftserve.errors import ServingError
from ftserve.testing import save_tiny_model
from test_engine import collect, greedy, references, write_random_adapter

PROMPT = [1, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def folders(llama_dir, gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_errors")
    good = write_random_adapter(llama_dir, root / "good", "lora", seed=7)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    wide = save_tiny_model(root / "wide_base", "llama", hidden=64, heads=2)
    return {
        "good": good,
        "corrupt": corrupt,
        "other_width": write_random_adapter(wide, root / "other_width", "lora", seed=8),
        "gpt2": write_random_adapter(gpt2_dir, root / "gpt2", "lora", seed=9, targets=["c_attn"]),
        "vera_gpt2": write_random_adapter(gpt2_dir, root / "vera_gpt2", "vera", seed=9, targets=["c_attn"]),
    }


def test_each_bad_request_fails_alone(llama_dir, folders, tmp_path):
    expected = references(llama_dir, folders["good"], [PROMPT], new=30)[0]

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, max_model_len=64, max_cpu_loras=1, max_loras=1)
        async with engine:
            await engine.load_adapter("good", str(folders["good"]))
            busy = [asyncio.create_task(collect(engine, GenerationRequest(PROMPT, adapter="good", params=greedy(30))))
                    for _ in range(3)]
            await asyncio.sleep(0.05)
            errors = {}
            for case, request in {
                "unknown adapter": GenerationRequest(PROMPT, adapter="nope"),
                "prompt too long": GenerationRequest(list(range(4, 68)), params=greedy(1)),
                "prompt + max_tokens too long": GenerationRequest(PROMPT, params=greedy(60)),
                "max_tokens 0": GenerationRequest(PROMPT, params=greedy(0)),
                "max_tokens -1": GenerationRequest(PROMPT, params=greedy(-1)),
                "top_p 0": GenerationRequest(PROMPT, params=SamplingParams(top_p=0.0)),
                "token id outside the vocabulary": GenerationRequest([1, 99999]),
                "empty prompt": GenerationRequest([]),
            }.items():
                with pytest.raises(ServingError) as info:
                    engine.generate(request)
                errors[case] = info.value
            for case in ("corrupt", "other_width", "gpt2", "vera_gpt2"):
                with pytest.raises(AdapterLoadError) as info:
                    await engine.load_adapter(case, str(folders[case]))
                errors[case] = info.value
            with pytest.raises(AdapterLoadError):
                await engine.load_adapter("missing", str(tmp_path / "no_such_folder"))
            with pytest.raises(AdapterExistsError):
                await engine.load_adapter("good", str(folders["good"]))
            with pytest.raises(UnknownAdapterError):
                await engine.unload_adapter("nope")
            outs = await asyncio.gather(*busy)
            names = [info.name for info in engine.list_adapters()]
            return errors, outs, names

    errors, outs, names = asyncio.run(main())
    assert all(ids == expected for ids, _, _ in outs)
    assert names == ["good"]
    assert isinstance(errors["unknown adapter"], UnknownAdapterError) and "'nope'" in str(errors["unknown adapter"])
    assert isinstance(errors["prompt too long"], ContextLengthError) and "64 tokens" in str(errors["prompt too long"])
    assert isinstance(errors["prompt + max_tokens too long"], ContextLengthError)
    for case in ("max_tokens 0", "max_tokens -1"):
        assert isinstance(errors[case], RequestError) and "max_tokens" in str(errors[case])
    assert "top_p" in str(errors["top_p 0"]) and "99999" in str(errors["token id outside the vocabulary"])
    assert "corrupt" in str(errors["corrupt"])
    assert "another base model" in str(errors["other_width"]) and " here, " in str(errors["other_width"])
    assert "another base model" in str(errors["gpt2"]) and "c_attn" in str(errors["gpt2"])
    assert errors["unknown adapter"].http_status == 404 and errors["corrupt"].http_status == 400


def test_adapter_that_breaks_after_eviction_fails_its_request_only(llama_dir, folders, tmp_path):
    """An evicted adapter is read again on use; if its folder went bad meanwhile, only its request fails."""
    broken = shutil.copytree(folders["good"], tmp_path / "later_broken")
    other = write_random_adapter(llama_dir, tmp_path / "other", "lora-fa", seed=3)

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, max_cpu_loras=1, max_loras=1, max_batch_size=1, max_queue=1)
        async with engine:
            await engine.load_adapter("broken", str(broken))
            await engine.load_adapter("other", str(other))  # evicts "broken" from memory
            (broken / "adapter_model.safetensors").write_bytes(b"garbage")
            with pytest.raises(AdapterLoadError):
                await collect(engine, GenerationRequest(PROMPT, adapter="broken", params=greedy(4)))
            ok = await collect(engine, GenerationRequest(PROMPT, adapter="other", params=greedy(4)))
            running = engine.generate(GenerationRequest(PROMPT, params=greedy(50)))
            await running.__anext__()  # holds the only row
            waiting = engine.generate(GenerationRequest(PROMPT, params=greedy(4)))
            first_wait = asyncio.create_task(waiting.__anext__())
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError):
                engine.generate(GenerationRequest(PROMPT, params=greedy(4)))
            await running.aclose()  # frees the row: the waiting request runs
            first = await first_wait
            await waiting.aclose()
            return ok, [first]

    ok, firsts = asyncio.run(main())
    assert ok[0] == references(llama_dir, other, [PROMPT], new=4)[0]
    assert all(chunk.completion_tokens == 1 for chunk in firsts)


def test_an_adapter_that_overflows_fails_its_requests_alone(llama_dir, folders, tmp_path):
    """Finite but huge factors pass the load checks and overflow in the forward pass: the requests using that
    adapter fail with a GenerationError naming it, greedy or sampled, and the batch beside them is unharmed."""
    from safetensors.torch import load_file, save_file

    huge = tmp_path / "huge"
    shutil.copytree(folders["good"], huge)
    weights = huge / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    expected = references(llama_dir, folders["good"], [PROMPT], new=12)[0]

    async def main():
        async with TorchEngine.from_pretrained(llama_dir, max_batch_size=8) as engine:
            await engine.load_adapter("good", str(folders["good"]))
            await engine.load_adapter("huge", str(huge))
            sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
            return await asyncio.gather(
                collect(engine, GenerationRequest(PROMPT, adapter="good", params=greedy(12))),
                collect(engine, GenerationRequest(PROMPT, adapter="huge", params=greedy(12))),
                collect(engine, GenerationRequest(PROMPT, adapter="huge", params=sampled)),
                collect(engine, GenerationRequest(PROMPT, params=sampled)),
                return_exceptions=True)

    good, huge_greedy, huge_sampled, base_sampled = asyncio.run(main())
    assert good[0] == expected and good[2] == "length"
    for failure in (huge_greedy, huge_sampled):
        assert isinstance(failure, GenerationError) and failure.http_status == 500
        assert "adapter 'huge'" in str(failure) and "not finite" in str(failure)
    assert len(base_sampled[0]) == 12
