"""PEFT as an independent oracle, both ways: PEFT loads what we save, we load what PEFT saves, same logits;
and LoRA+'s parameter groups against PEFT's ``create_loraplus_optimizer``."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from ftserve import FineTuningConfig, FineTuningModel, load_adapter
from ftserve.testing import random_adapter

from support.cases import ALPHA, CASES, KINDS, RANK, Case
from support.models import MODELS, logits, small_llama

# Tolerance: both sides compute the same fp32 products, in a different order for Delta-LoRA's rank-2r form.
TOL = dict(rtol=1e-5, atol=1e-5)

# The matrix, and two settings PEFT must read as we do: per-layer ranks and alphas (Llama's names), and a VeRA
# saved without its pair, which PEFT regenerates from the seed.
OURS = [*CASES, Case("lora-rslora-patterns", "llama", dict(
    method="lora", lora_r=RANK, lora_alpha=ALPHA, use_rslora=True, rank_pattern={"layers.1.self_attn.v_proj": 2},
    alpha_pattern={"down_proj": 3.0}))]
OURS += [Case("vera-pair-regenerated-from-seed", kind, dict(method="vera", lora_r=RANK, save_projection=False,
                                                            projection_prng_key=5)) for kind in KINDS]


@pytest.fixture(scope="module", autouse=True)
def libraries_imported():
    """PEFT imports bitsandbytes lazily, on its first load of a LoRA folder, and that import warns about torch.jit
    deprecations of its own: do it before any test captures warnings, so that what a test captures is only what
    PEFT says about the folder, whichever test runs first."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401


def expected_warning(w: warnings.WarningMessage, settings: dict) -> bool:
    """What PEFT warns on loading a folder, whoever wrote it: transformers' deprecation of a name PEFT reads
    (it warns on PEFT's own folders too), and, for VeRA saved without its pair, that the pair is regenerated."""
    if issubclass(w.category, FutureWarning) and "is_gradient_checkpointing" in str(w.message):
        return True
    return settings.get("save_projection") is False and "PRNG" in str(w.message)


@pytest.mark.parametrize("case", OURS, ids=[case.id for case in OURS])
def test_peft_loads_our_adapter_without_a_warning_and_gives_our_logits(case, tmp_path):
    """Every tensor random; a method with a snapshot (Delta-LoRA) past it, so the folder holds its exact
    plain-LoRA form (rank 2r)."""
    build, targets = MODELS[case.kind]
    model = random_adapter(build(), FineTuningConfig(target_modules=targets, **case.settings), seed=1, std=0.1)
    ours = logits(model)
    model.save_adapter(tmp_path / "adapter")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(build(), str(tmp_path / "adapter"))
    assert [str(w.message) for w in caught if not expected_warning(w, case.settings)] == []
    theirs = logits(peft_model)
    assert (ours - logits(build())).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(theirs, ours, **TOL)


PATTERNS = {  # (rank_pattern, alpha_pattern): a full suffix, a one-layer suffix, and a plain name
    "llama": ({"1.self_attn.v_proj": 2, "down_proj": 6}, {"down_proj": 3, "layers.0.self_attn.q_proj": 5}),
    "gpt2": ({"1.attn.c_attn": 2, "mlp.c_proj": 6}, {"mlp.c_proj": 3, "h.0.attn.c_attn": 5}),
}


def peft_config(case: str, kind: str):
    targets, fan_in_fan_out = list(MODELS[kind][1]), kind == "gpt2"
    if case == "lora-rslora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True, fan_in_fan_out=fan_in_fan_out)
    if case == "lora-patterns":
        ranks, alphas = PATTERNS[kind]
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                          fan_in_fan_out=fan_in_fan_out)
    return VeraConfig(r=8, target_modules=targets, projection_prng_key=3, fan_in_fan_out=fan_in_fan_out)


PEFT_CASES = [(f"{case}-{kind}", kind, case) for case in ("lora-rslora", "lora-patterns", "vera")
              for kind in MODELS]


@pytest.mark.parametrize("case, kind, peft_case", PEFT_CASES, ids=[c for c, _, _ in PEFT_CASES])
def test_we_load_peft_adapters_and_give_peft_logits(case, kind, peft_case, tmp_path):
    build = MODELS[kind][0]
    peft_model = get_peft_model(build(), peft_config(peft_case, kind))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # PEFT starts B and lambda_b at zero: randomise everything it trains
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    theirs = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    ours = load_adapter(build(), tmp_path / "peft")
    if peft_case != "vera":  # every layer got PEFT's rank and scale
        peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                       if hasattr(m, "lora_A") and "default" in m.lora_A}
        assert {n: (m.r["default"], m.scaling["default"]) for n, m in peft_layers.items()} == \
            {n: (layer.r, layer.scale) for n, layer in ours.adapter_layers.items()}
    assert (theirs - logits(build())).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours), theirs, **TOL)


@pytest.mark.parametrize("kind", list(MODELS))
def test_vera_pair_from_a_seed_equals_peft(kind):
    build, targets = MODELS[kind]
    peft_model = get_peft_model(build(), peft_config("vera", kind))
    ours = FineTuningModel(build(), FineTuningConfig(method="vera", lora_r=8, target_modules=targets,
                                                     projection_prng_key=3))
    assert torch.equal(ours.shared.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(ours.shared.vera_B, peft_model.base_model.vera_B["default"])


def test_loraplus_groups_equal_peft_create_loraplus_optimizer():
    """Same members, same learning rates (weight_decay 0: PEFT replaces it by loraplus_weight_decay). A trained
    norm weight (1-D) joins B's group and a trained lm_head (2-D) joins A's, in both."""
    lr, ratio = 1e-3, 16.0
    targets = ["q_proj", "v_proj", "down_proj"]

    ours = FineTuningModel(small_llama(), FineTuningConfig(method="lora+", lora_r=4, target_modules=targets,
                                                           loraplus_lr_ratio=ratio))
    peft_model = get_peft_model(small_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    for model in (ours.base_model, peft_model.base_model.model):
        model.model.norm.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)

    def lr_by_name(optimizer, named, rename):
        names = {id(p): rename(n) for n, p in named}
        return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}

    mine = lr_by_name(ours.create_optimizer(lr=lr, weight_decay=0.0), ours.named_parameters(),
                      lambda n: n.removeprefix("base_model."))
    theirs = lr_by_name(create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio),
                        peft_model.named_parameters(),
                        lambda n: n.removeprefix("base_model.model.").replace(".default", ""))
    assert mine == theirs
    assert mine["model.norm.weight"] == lr * ratio and mine["lm_head.weight"] == lr
    assert sum(1 for v in mine.values() if v == lr * ratio) == 2 * 3 + 1
