"""Verify a merged model against the unmerged adapter model it came from.

Both models run in fp32 on the same prompts, each prompt extended by the reference model's greedy tokens.
With ``z`` the reference logits and ``z'`` the merged model's, over all positions::

    diff = max |z' - z|,      tolerance = rtol(dtype of the merged weights) * max(1, max |z|)

    rtol: float32 1e-3, float16 1e-2, bfloat16 5e-2 (rounding W + delta once to the stored dtype)

Greedy tokens agree where ``argmax z' = argmax z``; a position where they differ counts as a disagreement only
when the reference prefers its own token by more than the tolerance (``z[top] - z[top'] > tolerance``),
otherwise it is a near-tie. The merge passes when ``diff <= tolerance`` and there is no disagreement.

The reference is the adapter folder loaded natively (``load_adapter``) for one adapter of weight 1; for several
adapters, or other weights, it is the base model with forward hooks adding ``sum_k w_k s_k B_k (A_k x)`` from
each adapter's exact plain-LoRA factors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..files.checkpoint import FLOATS, open_checkpoint, resolve_base
from .plan import AdapterSpec

RTOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village,",
           "def fibonacci(n):")


@dataclass
class VerifyReport:
    max_abs_diff: float
    tolerance: float
    positions: int
    disagreements: int
    near_ties: int
    dtype: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.disagreements == 0

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"{verdict}: largest logit difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g} for "
                f"{self.dtype} weights); greedy tokens agree at {self.positions - self.disagreements - self.near_ties}"
                f"/{self.positions} positions, {self.near_ties} near-ties, {self.disagreements} disagreements")


def verify_merge(base: str | os.PathLike, adapters: list[AdapterSpec], merged: str | os.PathLike,
                 prompts: tuple[str, ...] = PROMPTS, new_tokens: int = 8) -> VerifyReport:
    """Compare the merged folder with base + adapters on ``prompts``; see the module docstring."""
    from transformers import AutoModelForCausalLM

    base_path = resolve_base(base)
    merged_path = resolve_base(merged)
    reference = _reference_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapters)
    candidate = AutoModelForCausalLM.from_pretrained(merged_path, dtype=torch.float32).eval()
    dtype = _stored_dtype(merged_path)
    diff, scale, tops = 0.0, 1.0, []
    with torch.no_grad():
        for ids in _prompt_ids(prompts, merged_path, base_path, candidate.config.vocab_size):
            for _ in range(new_tokens):
                next_id = reference(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_id], dim=1)
            z = reference(input_ids=ids).logits[0].float()
            z2 = candidate(input_ids=ids).logits[0].float()
            diff = max(diff, float((z2 - z).abs().max()))
            scale = max(scale, float(z.abs().max()))
            tops.append((z, z.argmax(-1), z2.argmax(-1)))
    tolerance = RTOL.get(dtype, 1e-3) * scale
    positions = disagreements = near_ties = 0
    for z, top, top2 in tops:
        positions += len(top)
        for i in torch.nonzero(top != top2).flatten().tolist():
            if float(z[i, top[i]] - z[i, top2[i]]) > tolerance:
                disagreements += 1
            else:
                near_ties += 1
    return VerifyReport(diff, tolerance, positions, disagreements, near_ties, str(dtype).removeprefix("torch."))


def _reference_model(model, adapters: list[AdapterSpec]):
    from ..files.adapter_folder import read_adapter
    from ..methods.base import linear_shape
    from ..model import load_adapter

    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return load_adapter(model, adapters[0].path).eval()
    for spec in adapters:
        folder = read_adapter(spec.path)
        sizes = {name: linear_shape(model.get_submodule(name))[1] for name in folder.modules}
        for name, f in folder.lora_factors(sizes).items():
            A, B, s = f.A.float(), f.B.float(), f.scale * spec.weight
            model.get_submodule(name).register_forward_hook(
                lambda mod, inp, out, A=A, B=B, s=s: out + (inp[0] @ A.T @ B.T) * s)
    return model.eval()


def _stored_dtype(path) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for entry in open_checkpoint(path).tensors.values():
        if entry.dtype in FLOATS:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _prompt_ids(prompts, merged_path, base_path, vocab_size: int) -> list[torch.Tensor]:
    """Token ids from the merged (else the base) tokenizer; fixed random ids when neither has one."""
    from transformers import AutoTokenizer

    for path in (merged_path, base_path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            continue
        return [torch.tensor([tokenizer(p)["input_ids"]]) for p in prompts]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 12), generator=generator) for _ in prompts]
