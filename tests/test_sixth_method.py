"""A sixth method defined here, in the test alone, runs through every generic path: config, training, save and
load, fold, export, merge and serving. It proves that a method is one file and one registry entry: nothing
outside ftserve/methods/ needs to know its name.

The method, "gain LoRA": LoRA with one learned scalar gain per module,

    h = W x + g * s * B A x,      dense delta  g s B A,      exact plain-LoRA export  A' = A, B' = g B, same s,

with A Kaiming-uniform, B zero and g = gain_init (a setting of its own, in ``method_options``).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from ftserve import ConfigError, FineTuningConfig, FineTuningModel, export_adapter, load_adapter, read_adapter
from ftserve.methods import AdapterLayer, AdapterMethod, LoraFactors, register, unregister
from ftserve.methods.base import check_number
from ftserve.testing import randomise_adapter

from support.models import MODELS, TOY_IDS, logits
from support.training import train

FP32 = dict(rtol=1e-5, atol=1e-5)


class GainLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, scale: float, gain: float) -> None:
        super().__init__(base_layer)
        self.scale = scale
        kw = {"device": self.weight_device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.lora_gain = nn.Parameter(torch.tensor([gain], **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x: Tensor) -> Tensor:
        return x @ self.lora_A.T @ self.lora_B.T * (self.lora_gain * self.scale)

    def lora_factors(self) -> LoraFactors:
        return gain_factors(self.adapter_state(), self.scale)

    def adapter_state(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach(),
                "lora_gain": self.lora_gain.detach()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        for key, param in (("lora_A.weight", self.lora_A), ("lora_B.weight", self.lora_B),
                           ("lora_gain", self.lora_gain)):
            param.copy_(state[key])


def gain_factors(state: dict[str, Tensor], scale: float) -> LoraFactors:
    return LoraFactors(state["lora_A.weight"], state["lora_B.weight"] * state["lora_gain"], scale)


class GainLora(AdapterMethod):
    name = "gain-lora"
    title = "gain LoRA"
    spellings = ("loragain",)
    saved_keys = ("lora_A.weight", "lora_B.weight", "lora_gain")
    option_defaults = {"gain_init": 1.0}

    def validate(self, config):
        super().validate(config)
        check_number("method_options['gain_init']", config.method_options["gain_init"], positive=True)

    def create_layer(self, base_layer, module_name, config, shared):
        return GainLayer(base_layer, config.rank_for(module_name), config.scale_for(module_name),
                         config.method_options["gain_init"])

    def export_factors(self, state, shared, config, module_name, in_features):
        return gain_factors(state, config.scale_for(module_name))


@pytest.fixture(autouse=True, scope="module")
def registered():
    method = register(GainLora())
    yield method
    unregister(method.name)


def gain_model(kind: str, seed: int = 0, **config) -> FineTuningModel:
    build, targets = MODELS[kind]
    torch.manual_seed(seed)
    settings = dict(method="gain-lora", lora_r=4, lora_alpha=8, target_modules=targets,
                    method_options={"gain_init": 0.5}) | config
    model = FineTuningModel(build(), FineTuningConfig(**settings))
    randomise_adapter(model, seed)
    return model


# Config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["gain-lora", "Gain_LoRA", "GAIN LORA", "loragain"])
def test_its_name_and_spellings_are_accepted(spelling):
    config = FineTuningConfig(method=spelling)
    assert config.method == "gain-lora"
    assert config.method_options == {"gain_init": 1.0}
    from ftserve.config import METHODS
    assert METHODS[-1] == "gain-lora"


@pytest.mark.parametrize("options, message", [
    ({"gain_init": 0.0}, "method_options['gain_init'] must be > 0"),
    ({"gain_init": math.inf}, "method_options['gain_init'] must be a finite number"),
    ({"gain": 2.0}, "gain is not a setting of any method; gain-lora's settings are ['gain_init']"),
])
def test_its_own_setting_is_checked(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        FineTuningConfig(method="gain-lora", method_options=options)


def test_the_five_methods_refuse_its_setting():
    with pytest.raises(ConfigError, match="gain_init is a setting of gain-lora, not of lora"):
        FineTuningConfig(method="lora", method_options={"gain_init": 2.0})


def test_a_second_method_with_a_taken_spelling_is_refused():
    with pytest.raises(ValueError, match=r"spellings \['gainlora', 'loragain'\] are taken"):
        register(GainLora())


def test_unregistered_it_is_unknown_again():
    unregister("gain-lora")
    try:
        with pytest.raises(ConfigError, match="unknown method 'gain-lora'"):
            FineTuningConfig(method="gain-lora")
    finally:
        register(GainLora())


# Model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_train_step_changes_every_adapter_tensor_and_no_base_weight(kind):
    model = gain_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, model.create_optimizer(lr=1e-2), TOY_IDS, steps=2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trained} == {"lora_A", "lora_B", "lora_gain"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_and_load_give_the_same_outputs_and_config(kind, tmp_path):
    model = gain_model(kind)
    model.save_adapter(tmp_path / "adapter")
    loaded = load_adapter(MODELS[kind][0](), tmp_path / "adapter")
    assert loaded.config == model.config
    assert loaded.config.method_options == {"gain_init": 0.5}
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fold_equals_the_forward_and_unfold_restores_the_weights(kind):
    model = gain_model(kind)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapter_layers.items()}
    unfolded = logits(model)
    model.fold()
    torch.testing.assert_close(logits(model), unfolded, **FP32)
    model.unfold()
    for name, layer in model.adapter_layers.items():
        assert torch.equal(layer.base_layer.weight, weights[name])
    torch.testing.assert_close(logits(model), unfolded, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_export_is_a_plain_lora_that_peft_runs_as_the_adapter(kind, tmp_path):
    model = gain_model(kind)
    model.save_adapter(tmp_path / "native")
    export_adapter(tmp_path / "native", tmp_path / "plain")
    assert read_adapter(tmp_path / "plain").config.method == "lora"
    peft_model = PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "plain").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), **FP32)


# Merge and serving -----------------------------------------------------------------------------------

def saved_gain_adapter(base_dir, path, seed: int = 3):
    torch.manual_seed(seed)
    config = FineTuningConfig(method="gain-lora", lora_r=4, lora_alpha=8, target_modules="all-linear",
                              method_options={"gain_init": 0.5})
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.6 / param.shape[-1] ** 0.5))
    model.save_adapter(path)
    return model


@pytest.mark.parametrize("base", ["llama_dir", "gpt2_dir"])
def test_merge_writes_a_checkpoint_with_the_adapters_logits(base, request, tmp_path):
    from ftserve.merge import AdapterSpec, merge_checkpoint

    base_dir = request.getfixturevalue(base)
    model = saved_gain_adapter(base_dir, tmp_path / "adapter")
    merge_checkpoint(base_dir, [AdapterSpec(tmp_path / "adapter")], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(model), **FP32)
    assert "gain-lora" in (tmp_path / "merged" / "README.md").read_text()


def test_the_torch_engine_serves_it_with_the_unmerged_models_greedy_tokens(llama_dir, tmp_path):
    from ftserve.engine.base import GenerationRequest, SamplingParams
    from ftserve.engine.torch import TorchEngine

    model = saved_gain_adapter(llama_dir, tmp_path / "adapter").eval()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40, 41]]
    expected = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=3)[0, len(p):].tolist() for p in prompts]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def serve() -> list[list[int]]:
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            await engine.load_adapter("gain", str(tmp_path / "adapter"))

            async def tokens(prompt):
                return [t async for chunk in engine.generate(GenerationRequest(prompt, adapter="gain", params=greedy))
                        for t in chunk.token_ids]

            return list(await asyncio.gather(*[tokens(p) for p in prompts]))

    assert asyncio.run(serve()) == expected
