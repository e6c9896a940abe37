"""DoRA adapters (arXiv:2402.09353) served unmerged on the torch engine, with PEFT as the oracle and the writer of
their folders (``LoraConfig(use_dora=True)``, ``save_pretrained``; support/engine.py's ``write_peft_dora``).

Served, a DoRA adapter is the row-scaled form ``y = r * (W x + s B A x) + bias``, ``r = m / ||W + s B A||_row``
computed once per load from the served base weight (ftserve/engine/torch/adapter_cache.py). Its rows share the
step's slots with plain-LoRA rows (LoRA, VeRA, Delta-LoRA) and the base model's; a wrong row scale, one applied to
the wrong rows, or a scaled bias changes greedy tokens, which every test compares.
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ftserve.engine.base import GenerationRequest
from ftserve.testing import build_tokenizer, tiny_gpt2

from support.engine import NEW, PROMPTS, greedy, references, write_peft_dora, write_random_adapter
from support.processes import ServerProcess

BASE = "tiny-base"
PLAIN = ("lora", "vera", "delta-lora")  # the plain-form methods served beside DoRA
LONG_PROMPT = [1] + [(7 * i) % 200 + 10 for i in range(100)]  # past merged_rows: prefilled on a merged weight
BIAS_STD = 0.1


@pytest.fixture(scope="module")
def biased_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with nonzero biases (the conftest one's are zero, which would hide a bias scaled by mistake)."""
    path = tmp_path_factory.mktemp("gpt2-biased") / "base"
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * BIAS_STD)
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def peft_greedy(base_dir, adapter, prompts) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=3)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("base", ["llama_dir", "biased_gpt2_dir"])
def test_a_peft_trained_dora_adapter_gives_peft_greedy_tokens_on_the_torch_engine(base, request, tmp_path):
    """The PEFT-trained adapter's requests, at once beside the base model's (decode steps mix scaled and unscaled
    rows), and a long prompt alone (prefilled on the merged weight ``diag(r) (W + s B A)``)."""
    from ftserve.engine.torch import TorchEngine

    base_dir = request.getfixturevalue(base)
    adapter = write_peft_dora(base_dir, tmp_path / "dora", seed=7)
    expected = peft_greedy(base_dir, adapter, [*PROMPTS, LONG_PROMPT])
    expected_base = peft_greedy(base_dir, None, PROMPTS)
    assert expected[:len(PROMPTS)] != expected_base  # the adapter changes the answers

    async def serve():
        async with TorchEngine.from_pretrained(base_dir) as engine:
            await engine.load_adapter("dora", str(adapter))

            async def tokens(prompt, name):
                request = GenerationRequest(prompt, adapter=name, params=greedy())
                return [t async for chunk in engine.generate(request) for t in chunk.token_ids]

            alone = await tokens(LONG_PROMPT, "dora")
            mixed = await asyncio.gather(*[tokens(p, n) for n in ("dora", None) for p in PROMPTS])
            return [*mixed[:len(PROMPTS)], alone], list(mixed[len(PROMPTS):])

    served, served_base = asyncio.run(serve())
    assert served == expected
    assert served_base == expected_base


# A real server: DoRA, LoRA, VeRA and Delta-LoRA adapters and the base model at once ----------------------------

@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    """--adapter-root: a PEFT DoRA adapter and one of each plain method given at startup; two more DoRA adapters,
    one for the load API and one for first-use resolution."""
    root = tmp_path_factory.mktemp("dora_root")
    write_peft_dora(llama_dir, root / "dora", seed=11)
    for i, method in enumerate(PLAIN):
        write_random_adapter(llama_dir, root / method, method, seed=30 + i)
    write_peft_dora(llama_dir, root / "late-dora", seed=12)
    shutil.copytree(root / "late-dora", root / "team" / "dora")
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    args = [str(llama_dir), "--served-model-name", BASE, "--max-loras", "6", "--enable-adapter-api",
            "--enable-adapter-resolution", "--adapter-root", str(root)]
    for name in ("dora", *PLAIN):
        args.append(f"--adapter={name}={root / name}")
    proc = ServerProcess(args, tmp_path_factory.mktemp("dora_log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def answer(server, model: str, prompt: list[int]) -> list[str]:
    """The greedy answer's tokens, each as its text."""
    response = server.client().completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
                                                  logprobs=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == NEW
    return response.choices[0].logprobs.tokens


def as_texts(tokenizer, ids_per_prompt) -> list[list[str]]:
    return [[tokenizer.decode([t]) for t in ids] for ids in ids_per_prompt]


def test_concurrent_requests_of_dora_plain_adapters_and_the_base_each_get_their_solo_answer(server, root, llama_dir,
                                                                                           tokenizer):
    """Every request at once, twice over (steps mix rows of all five), against each one's unmerged FineTuningModel
    and, for DoRA, PEFT's own forward."""
    folders = {BASE: None, "dora": root / "dora", **{m: root / m for m in PLAIN}}
    expected = {name: as_texts(tokenizer, references(llama_dir, folder, PROMPTS)) for name, folder in folders.items()}
    assert as_texts(tokenizer, peft_greedy(llama_dir, root / "dora", PROMPTS)) == expected["dora"]
    assert len({tuple(map(tuple, texts)) for texts in expected.values()}) == len(expected)  # each changes them
    jobs = [(name, i) for name in folders for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: answer(server, job[0], PROMPTS[job[1]]), jobs))
    assert got == [expected[name][i] for name, i in jobs]


def test_the_load_api_loads_a_dora_folder_whose_answers_are_its_own(server, root, llama_dir, tokenizer):
    response = httpx.post(server.url + "/v1/load_lora_adapter",
                          json={"lora_name": "late", "lora_path": str(root / "late-dora")}, timeout=60)
    assert response.status_code == 200, response.text
    expected = as_texts(tokenizer, references(llama_dir, root / "late-dora", PROMPTS))
    jobs = [(name, p) for name in ("late", "dora", "lora") for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: answer(server, *job), jobs))
    assert got[:len(PROMPTS)] == expected
    assert got[len(PROMPTS):2 * len(PROMPTS)] != expected  # the other DoRA adapter answers differently


def test_first_use_resolution_loads_a_dora_folder(server, root, llama_dir, tokenizer):
    assert "team/dora" not in [card.id for card in server.client().models.list().data]
    expected = as_texts(tokenizer, references(llama_dir, root / "team" / "dora", PROMPTS))
    assert [answer(server, "team/dora", p) for p in PROMPTS] == expected
