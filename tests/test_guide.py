"""The guide's example, as written, through the guide's import name, with the tiny Llama for the model."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from finetuning_toolkit import FineTuningConfig, FineTuningModel
from ftserve.testing import randomise_adapter, tiny_llama

from support.cases import METHODS
from support.models import target_shapes

LINE = re.compile(r"^trainable params: (\d{1,3}(?:,\d{3})*) \|\| all params: (\d{1,3}(?:,\d{3})*) "
                  r"\|\| trainable%: (\d+\.\d{4})\n$")


def guide_config(method: str, **overrides) -> FineTuningConfig:
    settings = dict(method=method, lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Delta-LoRA turns the guide's dropout off, with a warning
        return FineTuningConfig(**{**settings, **overrides})


def parse_line(text: str) -> tuple[int, int, str]:
    match = LINE.match(text)
    assert match, f"not the guide's format: {text!r}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), match[3]


@pytest.mark.parametrize("method", METHODS)
def test_guide_example_trains_saves_and_generates(method, tokenizer, tmp_path, capsys):
    base = tiny_llama()
    shapes = target_shapes(base, ["q_proj", "v_proj"])
    base_count = sum(p.numel() for p in base.parameters())

    model = FineTuningModel(base, guide_config(method))
    model.print_trainable_parameters()
    trainable, total, percent = parse_line(capsys.readouterr().out)
    assert trainable == model.method.trainable_parameters(model.config, shapes)
    assert total == base_count + trainable + model.method.frozen_parameters(model.config, shapes)
    assert percent == f"{100 * trainable / total:.4f}"

    optimizer = model.create_optimizer(lr=2e-4)
    batch = tokenizer(["the cat sees a red fox", "a small bird sings in the tree"], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        outputs = model(**batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(outputs.loss)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "the optimizer moved no adapter tensor"

    model.save_adapter(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "adapter" / "ftserve_config.json").read_text())
    assert ours["method"] == method and saved["peft_type"] == model.method.peft_type

    randomise_adapter(model, seed=0, std=0.5)  # an adapter strong enough to change what greedy decoding picks
    model.eval()
    prompt = tokenizer("the cat", return_tensors="pt")
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    generated = model.generate(**prompt, **settings)
    ids = prompt["input_ids"]
    with torch.no_grad():  # greedy decoding by hand through the adapted forward gives the same tokens
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    assert not torch.equal(generated, tiny_llama().generate(**prompt, **settings))


def test_guide_line_reproduced_for_llama_7b_shapes(capsys):
    """LoRA r=8 on q_proj and v_proj of a Llama-7B-shaped model (built on the meta device, no memory) prints the
    guide's line to the character: 32 layers x 2 modules x 8 x (4096 + 4096) = 4,194,304."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    model = FineTuningModel(base, guide_config("lora", lora_r=8))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in model.adapter_layers.items()}
    assert model.method.trainable_parameters(model.config, shapes) == 4_194_304
