"""In-memory folding: fold / unfold / merge_and_unload for every method, on Llama- and GPT-2-shaped models."""

import pytest
import torch

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.methods import AdapterLayer
from ftserve.testing import tiny_gpt2, tiny_llama

from support.cases import CASE_IDS, CASES
from support.models import FP32, IDS, tiny_model, trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fold_unfold_and_merge_and_unload_match_unmerged_forward(case):
    model = trained(tiny_model(case.kind), case.settings)
    weights = {n: layer.base_layer.weight for n, layer in model.adapter_layers.items()}
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        model.fold()
        folded = model(input_ids=IDS).logits
        model.unfold()
        again = model(input_ids=IDS).logits
    torch.testing.assert_close(folded, unmerged, **FP32)
    assert torch.equal(again, unmerged), "unfold must restore the exact base weights"
    for n, layer in model.adapter_layers.items():
        assert layer.base_layer.weight is weights[n]
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert type(plain).__module__.startswith("transformers.")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, **FP32)


def test_fold_in_bf16_rounds_once_from_fp32():
    """Hand-placed factors: delta W[4, 5] = s * B[4, 1] * A[1, 5] = 2 * 12 * 0.5 = 12; every other delta is tiny
    and must survive only through one fp32 add and one rounding, never a bf16 add."""
    base = tiny_llama(dtype=torch.bfloat16)
    model = FineTuningModel(base, FineTuningConfig(method="lora", lora_r=2, lora_alpha=4, target_modules=["q_proj"]))
    layer = model.adapter_layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_A.weight.zero_()
        layer.lora_B.weight.zero_()
        layer.lora_A.weight[1, 5] = 0.5
        layer.lora_B.weight[4, 1] = 12.0
        layer.lora_A.weight[0] = 1e-3
        layer.lora_B.weight[:, 0] = torch.linspace(-1, 1, layer.out_features)
    W = layer.base_layer.weight.detach().clone()
    delta = layer.lora_factors().delta_weight()
    model.fold()
    folded = layer.base_layer.weight
    assert folded.dtype == torch.bfloat16
    assert torch.equal(folded, (W.float() + delta).to(torch.bfloat16))
    assert float(folded[4, 5]) == pytest.approx(float(W[4, 5]) + 12.0, abs=0.0625)  # one bf16 step at 12
    model.unfold()
    assert torch.equal(layer.base_layer.weight, W)


def test_folding_the_tied_lm_head_unties_instead_of_changing_the_input_embeddings():
    base = tiny_gpt2()
    embeddings = base.get_input_embeddings().weight.detach().clone()
    model = trained(base, dict(method="lora", lora_r=4, lora_alpha=8), targets=["c_attn", "lm_head"])
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
    plain = model.merge_and_unload()
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.get_input_embeddings().weight, embeddings)
    assert not torch.equal(plain.get_output_embeddings().weight, embeddings)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, **FP32)
