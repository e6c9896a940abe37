"""The torch engine's batched LoRA layer, and the helpers every engine test uses (the behaviours every engine
shares are in test_engine_contract.py).

``write_random_adapter`` gives adapters of all five methods random nonzero factors (B starts at zero in
training) at a scale that changes greedy tokens, so a row served with the wrong adapter, or none, is caught.
"""

import torch
from transformers import AutoModelForCausalLM

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.engine.base import SamplingParams
from ftserve.engine.torch.lora_slots import BatchedLoraLinear, LoraBatch, LoraContext

METHODS = ["lora", "lora+", "lora-fa", "vera", "delta-lora"]
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 100, 200, 300, 400, 500, 600, 700, 800]]
NEW = 8


def write_random_adapter(base_dir, out, method: str, seed: int, r: int = 4, targets="all-linear"):
    """An adapter whose every tensor is random (Delta-LoRA: after its start snapshot, so it exports rank 2r)."""
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained(base_dir),
                            FineTuningConfig(method=method, lora_r=r, lora_alpha=2 * r, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)

    def randomise():
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "vera_lambda" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                elif "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.6 / param.shape[-1] ** 0.5))

    randomise()
    if method == "delta-lora":
        for layer in model.adapter_layers.values():
            layer.start_weight_updates()
        randomise()
    model.save_adapter(out)
    return out


def references(base_dir, adapter_dir, prompts, new=NEW, merged=False) -> list[list[int]]:
    """Greedy tokens of each request alone: FineTuningModel with the adapter unmerged (or merged), no engine."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = FineTuningModel.from_pretrained(model, adapter_dir)
        if merged:
            model = model.merge_and_unload()
    outs = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=3) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


def greedy(max_tokens=NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, request) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    async for chunk in engine.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
    return ids, text, finish


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
    batch = LoraBatch.for_rows([0] * 13 + [1, 2, None])
    assert batch.m == 5 and batch.chunks == 5  # slot 0 cut into 3 chunks of 5; padded rows 25 <= 2 * 15 + 3
    assert sorted(set(batch.gather.tolist())) == list(range(15))
    assert batch.scatter[15] == 25  # the base row reads the zero row past the layout
    assert batch.slot_range is None and batch.slot_index.tolist() == [0, 0, 0, 1, 2]
