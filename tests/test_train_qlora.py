"""QLoRA (ftserve/train/quantized.py, ftserve/merge/dequantized.py) on bitsandbytes' CPU backend: every method
trains on Linear4bit layers and reloads to identical logits; `ftserve train --load-in-4bit` records the recipe;
`ftserve merge` writes 16-bit models into the original base and, with --into dequantized, into the exact weights
the adapter was trained against; both reload in transformers."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ftserve import FineTuningConfig, FineTuningModel, load_adapter  # noqa: E402
from ftserve.cli import main  # noqa: E402
from ftserve.methods import METHODS as REGISTRY  # noqa: E402
from ftserve.testing import toy_sentences  # noqa: E402
from ftserve.train import AdapterTrainer, load_base_model  # noqa: E402

from support.cases import METHODS, start_step  # noqa: E402
from support.models import logits  # noqa: E402
from support.training import toy_dataset, toy_loss  # noqa: E402
from support.training import trainer_arguments as arguments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_linear4bit_and_reloads_to_identical_logits(method, llama_dir, tmp_path):
    base = load_base_model(str(llama_dir), load_in_4bit=True)
    quick = REGISTRY[method].quickstart_settings
    config = FineTuningConfig(method=method, lora_r=int(quick["rank"]), **start_step(method, 1),
                              target_modules=["q_proj", "v_proj", "down_proj"])
    model = FineTuningModel(base, config)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in model.adapter_layers.values())
    before = toy_loss(model)
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path / "run", bf16=True, max_steps=4,
                                                         learning_rate=quick["lr"]), train_dataset=toy_dataset())
    trainer.train()
    assert toy_loss(model) < before - 0.01
    model.save_adapter(tmp_path / "adapter")
    reloaded = load_adapter(load_base_model(str(llama_dir), load_in_4bit=True), tmp_path / "adapter")
    # The trainer left the model's forward under bf16 autocast (accelerate's mixed precision); so is the reload's.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(reloaded)
    torch.testing.assert_close(expected.float(), logits(model), rtol=0, atol=0)


def test_train_in_4bit_then_merge_into_the_base_and_into_the_dequantized_weights(llama_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in toy_sentences(32)))
    adapter = tmp_path / "adapter"
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(llama_dir), str(data), "-o", str(adapter), "--load-in-4bit", "--bf16",
                                  "--max-steps", "4", "--lr", "1e-2", "--targets", "q_proj,v_proj"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recipe = json.loads((adapter / "ftserve_config.json").read_text())["quantized_base"]
    assert recipe["bnb_4bit_quant_type"] == "nf4" and recipe["bnb_4bit_use_double_quant"] is True
    assert recipe["bnb_4bit_compute_dtype"] == "bfloat16" and "model.layers.0.mlp.down_proj" in recipe["modules"]

    for into in ("base", "dequantized"):
        result = runner.invoke(main, ["merge", str(llama_dir), str(adapter), "-o", str(tmp_path / into),
                                      "--into", into], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    card = (tmp_path / "dequantized" / "README.md").read_text()
    assert f"{llama_dir} (its 4-bit weights, dequantized)" in card and ".dequantized-" not in card

    # Into the dequantized weights: every quantized weight is what the 4-bit model computed with, in bf16, and
    # the adapted ones that plus the adapter's delta.
    quantized = load_base_model(str(llama_dir), load_in_4bit=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    trained = load_adapter(load_base_model(str(llama_dir), load_in_4bit=True), adapter)
    for name in recipe["modules"]:
        layer = quantized.get_submodule(name)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        expected = dequantized.float()
        if name in trained.adapter_layers:
            expected = (expected + trained.adapter_layers[name].delta_weight()).to(torch.bfloat16).float()
        torch.testing.assert_close(merged.get_submodule(name).weight.float(), expected, rtol=0, atol=0, msg=name)
    # Into the original base: the unquantized weights plus the same delta, in the base's dtype.
    original = AutoModelForCausalLM.from_pretrained(llama_dir)
    into_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    name = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(into_base.get_submodule(name).weight,
                               original.get_submodule(name).weight + trained.adapter_layers[name].delta_weight(),
                               rtol=1e-6, atol=1e-6)
    # The dequantized merge computes what the 4-bit model with the adapter computed, up to bf16 rounding.
    torch.testing.assert_close(logits(merged.to(torch.bfloat16)).float(), logits(trained).float(), rtol=0.05,
                               atol=0.05)


def test_merging_into_dequantized_weights_needs_a_qlora_adapter(llama_dir, tmp_path):
    from ftserve.testing import save_random_adapter

    save_random_adapter(str(llama_dir), "lora", tmp_path / "plain")
    result = CliRunner().invoke(main, ["merge", str(llama_dir), str(tmp_path / "plain"), "-o", str(tmp_path / "m"),
                                       "--into", "dequantized"])
    assert result.exit_code == 1 and "was not trained on a 4-bit base" in result.output
    assert not (tmp_path / "m").exists()
