"""`export`: every method as a plain PEFT LoRA that PEFT itself loads and runs to the original logits."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel, VeraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ftserve import AdapterFileError, export_adapter
from ftserve.cli import main

from support.cases import CASE_IDS, CASES
from support.models import FP32, IDS, trained

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_loads_every_export_and_reproduces_the_adapter(tmp_path, llama_dir, gpt2_dir, case):
    base_dir = llama_dir if case.kind == "llama" else gpt2_dir
    model = trained(AutoModelForCausalLM.from_pretrained(base_dir), case.settings)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_adapter(tmp_path / "native")
    if case.method.row_scaled:  # no plain LoRA computes its row scale: refused in one line, nothing written
        with pytest.raises(AdapterFileError, match="no plain-LoRA export") as caught:
            export_adapter(tmp_path / "native", tmp_path / "plain")
        assert "\n" not in str(caught.value) and not (tmp_path / "plain").exists()
        return
    export_adapter(tmp_path / "native", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert {config["r"]} == {f.rank for f in model.lora_factors().values()}  # the served form's (Delta-LoRA: 2r)
    scale = model.config.scale_for("any")
    assert config["lora_alpha"] == pytest.approx(scale * config["r"])  # rsLoRA folded into alpha
    assert config["fan_in_fan_out"] is (case.kind == "gpt2")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, **FP32)


def test_peft_saved_vera_exports_with_layer_sizes_from_the_base(tmp_path, llama_dir):
    """PEFT's VeRA folder records no layer input sizes; `--base` derives them from config.json on the meta
    device."""
    peft_vera = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                               VeraConfig(r=16, target_modules=["q_proj", "down_proj"], save_projection=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_vera.named_parameters():
            if "vera_lambda" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        expected = peft_vera.eval()(input_ids=IDS).logits
    peft_vera.save_pretrained(tmp_path / "vera")
    with pytest.raises(AdapterFileError, match="pass the base model"):
        export_adapter(tmp_path / "vera", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    result = CliRunner().invoke(main, ["export", str(tmp_path / "vera"), "-o", str(tmp_path / "plain"),
                                       "--base", str(llama_dir)])
    assert result.exit_code == 0, result.output
    assert "Exported vera adapter as plain LoRA (r=16" in result.output
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, **FP32)
    again = CliRunner().invoke(main, ["export", str(tmp_path / "vera"), "-o", str(tmp_path / "plain"),
                                      "--base", str(llama_dir)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.output
