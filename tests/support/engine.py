"""For the engine tests: prompts, random adapters that change greedy tokens, the tokens each request gets
alone, and the sampling and collection every test repeats."""

from __future__ import annotations

from pathlib import Path

import torch

from ftserve import FineTuningModel
from ftserve.testing import peft_dora_model, save_random_adapter

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 100, 200, 300, 400, 500, 600, 700, 800]]
NEW = 8


def write_random_adapter(base_dir, out, method: str, seed: int, r: int = 4, targets="all-linear") -> Path:
    """An adapter of ``method`` whose every tensor is random (Delta-LoRA: after its start snapshot, so it exports
    rank 2r) at a scale that changes greedy tokens, so that a row served with the wrong adapter, or none, is
    caught."""
    return save_random_adapter(base_dir, method, out, seed, std=0.6, fan_in=True, rank=r, targets=targets)


def write_peft_dora(base_dir, out, seed: int, r: int = 4, steps: int = 3, lr: float = 1e-2) -> Path:
    """A DoRA adapter trained by PEFT alone (``peft_dora_model``: factors drawn at the scale of
    ``write_random_adapter``, so that it changes greedy tokens), then ``steps`` AdamW steps on the toy batch, which
    move each magnitude m off its start, and ``save_pretrained``."""
    from .models import TOY_IDS
    from .training import train

    model = peft_dora_model(base_dir, r, seed, std=0.6)
    train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr), TOY_IDS, steps)
    model.save_pretrained(out)
    return Path(out)


def references(base_dir, adapter_dir, prompts, new=NEW, merged=False) -> list[list[int]]:
    """Greedy tokens of each request alone: FineTuningModel with the adapter unmerged (or merged), no engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = FineTuningModel.from_pretrained(model, adapter_dir)
        if merged:
            model = model.merge_and_unload()
    outs = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=3) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


def greedy(max_tokens=NEW, **kw):
    from ftserve.engine.base import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, request) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    async for chunk in engine.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
    return ids, text, finish
