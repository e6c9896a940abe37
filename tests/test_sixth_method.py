"""Two more methods defined here, in the test alone, run through every generic path: config, training, save and
load, fold, export, merge and serving. They prove that a method is one file and one registry entry, in either
served form (ftserve/methods/factors.py): nothing outside ftserve/methods/ needs to know their names.

The plain form, "gain LoRA": LoRA with one learned scalar gain per module,

    h = W x + g * s * B A x,      dense delta  g s B A,      exact plain-LoRA export  A' = A, B' = g B, same s,

with A Kaiming-uniform, B zero and g = gain_init (a setting of its own, in ``method_options``).

The row-scaled form, "row-norm LoRA": DoRA's math (arXiv:2402.09353), a magnitude m per output row,

    h = r * (W x + s B A x) + bias,     r = m / ||W + s B A||_row (detached in training, as DoRA does),
    folded  W' = diag(r) (W + s B A),   no plain-LoRA export,

with m starting at ``||W||_row``; saved as PEFT's DoRA (``use_dora``, ``lora_magnitude_vector``).
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
from ftserve.errors import AdapterFileError
from ftserve.methods import AdapterLayer, AdapterMethod, LoraFactors, register, unregister
from ftserve.methods.base import check_number
from ftserve.testing import build_tokenizer, randomise_adapter, tiny_gpt2

from support.models import MODELS, TOY_IDS, logits, with_biases
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


class RowNormLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, scale: float) -> None:
        super().__init__(base_layer)
        self.scale = scale
        kw = {"device": self.weight_device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.lora_magnitude_vector = nn.Parameter(self.base_weight().norm(dim=1).to(**kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        """``r * (out - bias + s B A x) + bias``, the norm of the adapted weight detached."""
        adapted = self.base_weight() + self.scale * self.lora_B @ self.lora_A
        r = self.lora_magnitude_vector / adapted.norm(dim=1).detach()
        bias = self.base_layer.bias
        unbiased = out.float() if bias is None else out.float() - bias.float()
        y = r * (unbiased + x.float() @ self.lora_A.T @ self.lora_B.T * self.scale)
        return (y if bias is None else y + bias.float()).to(out.dtype)

    def lora_factors(self) -> LoraFactors:
        return row_norm_factors(self.adapter_state(), self.scale)

    def adapter_state(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach(),
                "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        for key, param in (("lora_A.weight", self.lora_A), ("lora_B.weight", self.lora_B),
                           ("lora_magnitude_vector", self.lora_magnitude_vector)):
            param.copy_(state[key])


def row_norm_factors(state: dict[str, Tensor], scale: float) -> LoraFactors:
    return LoraFactors(state["lora_A.weight"], state["lora_B.weight"], scale, state["lora_magnitude_vector"])


class RowNormLora(AdapterMethod):
    name = "row-norm-lora"
    title = "row-norm LoRA"
    saved_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    row_scaled = True
    peft_variant = "use_dora"  # saved as PEFT's DoRA, as ftserve's own DoRA is

    def create_layer(self, base_layer, module_name, config, shared):
        return RowNormLayer(base_layer, config.rank_for(module_name), config.scale_for(module_name))

    def export_factors(self, state, shared, config, module_name, in_features):
        return row_norm_factors(state, config.scale_for(module_name))


@pytest.fixture(autouse=True, scope="module")
def registered():
    methods = [register(RowNormLora()), register(GainLora())]  # gain-lora last: the spelling test expects it
    yield methods
    for method in methods:
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


def test_the_built_in_methods_refuse_its_setting():
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


# The row-scaled form: row-norm LoRA ------------------------------------------------------------------------

@torch.no_grad()
def spread_magnitudes(model: FineTuningModel, seed: int) -> None:
    """Set every magnitude to ``||W + s B A||_row`` times 1 +- 0.3, so that ``r`` differs visibly from one and
    per row, as training makes it (``randomise_adapter`` draws it around zero)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.adapter_layers.values():
        adapted = layer.base_weight() + layer.scale * layer.lora_B @ layer.lora_A
        noise = torch.rand(layer.out_features, generator=generator) * 0.6 - 0.3
        layer.lora_magnitude_vector.copy_(adapted.norm(dim=1) * (1 + noise))


def biased_small_gpt2() -> nn.Module:
    return with_biases(MODELS["gpt2"][0]())


ROW_NORM_MODELS = {"llama": MODELS["llama"], "gpt2": (biased_small_gpt2, MODELS["gpt2"][1])}


def row_norm_model(kind: str, seed: int = 0) -> FineTuningModel:
    build, targets = ROW_NORM_MODELS[kind]
    torch.manual_seed(seed)
    model = FineTuningModel(build(), FineTuningConfig(method="row-norm-lora", lora_r=4, lora_alpha=8,
                                                      target_modules=targets))
    randomise_adapter(model, seed)
    spread_magnitudes(model, seed)
    return model


def test_a_fresh_row_norm_adapter_is_the_identity():
    """m starts at ||W||_row and B at zero, so r = 1 and the model is the base model, biases included."""
    build, targets = ROW_NORM_MODELS["gpt2"]
    base_logits = logits(build())
    model = FineTuningModel(build(), FineTuningConfig(method="row-norm-lora", lora_r=4, target_modules=targets))
    torch.testing.assert_close(logits(model), base_logits, **FP32)


@pytest.mark.parametrize("kind", sorted(ROW_NORM_MODELS))
def test_a_row_norm_train_step_changes_every_adapter_tensor_and_no_base_weight(kind):
    model = row_norm_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, model.create_optimizer(lr=1e-2), TOY_IDS, steps=2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trained} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


@pytest.mark.parametrize("kind", sorted(ROW_NORM_MODELS))
def test_a_row_norm_adapter_saves_and_loads_and_peft_runs_it_as_dora(kind, tmp_path):
    model = row_norm_model(kind)
    model.save_adapter(tmp_path / "adapter")
    build = ROW_NORM_MODELS[kind][0]
    loaded = load_adapter(build(), tmp_path / "adapter")
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), **FP32)


@pytest.mark.parametrize("kind", sorted(ROW_NORM_MODELS))
def test_row_norm_fold_scales_the_rows_leaves_the_bias_and_unfold_restores(kind):
    model = row_norm_model(kind)
    layers = model.adapter_layers
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    biases = {n: layer.base_layer.bias.detach().clone() for n, layer in layers.items()
              if layer.base_layer.bias is not None}
    unfolded = logits(model)
    name, layer = next(iter(layers.items()))
    f = layer.lora_factors()
    expected = f.folded_weight(layer.base_weight())  # diag(r) (W + s B A), by hand:
    adapted = layer.base_weight().double() + f.scale * f.B.double() @ f.A.double()
    by_hand = adapted * (f.magnitude.double() / adapted.norm(dim=1)).unsqueeze(1)
    torch.testing.assert_close(expected.double(), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight().double(), by_hand - layer.base_weight().double(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="depends on the base weight"):
        f.delta_weight()
    model.fold()
    folded = layer.base_layer.weight.T if layer.is_conv1d else layer.base_layer.weight
    torch.testing.assert_close(folded.double(), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model), unfolded, **FP32)
    for n, bias in biases.items():
        assert torch.equal(layers[n].base_layer.bias, bias)
    model.unfold()
    for n, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, weights[n])
    torch.testing.assert_close(logits(model), unfolded, rtol=0, atol=0)


def test_row_norm_export_is_refused_with_a_one_line_reason(tmp_path):
    row_norm_model("llama").save_adapter(tmp_path / "native")
    with pytest.raises(AdapterFileError) as caught:
        export_adapter(tmp_path / "native", tmp_path / "plain")
    message = str(caught.value)
    assert "\n" not in message
    assert "no plain-LoRA export: a row-norm LoRA adapter (method row-norm-lora) scales each output row" in message
    assert "merge it into the base model (`ftserve merge`) or serve it on the torch engine instead" in message
    assert not (tmp_path / "plain").exists()


def saved_row_norm_adapter(base_dir, path, seed: int = 4):
    torch.manual_seed(seed)
    config = FineTuningConfig(method="row-norm-lora", lora_r=4, lora_alpha=8, target_modules="all-linear")
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained(base_dir), config)
    randomise_adapter(model, seed, std=0.6, fan_in=True)
    spread_magnitudes(model, seed)
    model.save_adapter(path)
    return model.eval()


@pytest.fixture(scope="module")
def biased_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with nonzero biases, saved as a Hugging Face folder (the conftest one's biases are zero)."""
    path = tmp_path_factory.mktemp("gpt2-biased") / "base"
    model = with_biases(tiny_gpt2())
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.mark.parametrize("base", ["llama_dir", "biased_gpt2_dir"])
def test_merge_writes_a_checkpoint_with_the_row_norm_adapters_logits(base, request, tmp_path):
    from ftserve.merge import AdapterSpec, merge_checkpoint

    base_dir = request.getfixturevalue(base)
    model = saved_row_norm_adapter(base_dir, tmp_path / "adapter")
    merge_checkpoint(base_dir, [AdapterSpec(tmp_path / "adapter")], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(model), **FP32)


def test_the_vllm_engine_refuses_a_row_norm_adapter_by_name(llama_dir, tmp_path):
    """The check runs before anything of vLLM is imported, at runtime and for the adapters given at startup."""
    from ftserve.engine.errors import AdapterLoadError
    from ftserve.engine.vllm.adapters import base_shapes, derived_max_lora_rank, prepare

    saved_row_norm_adapter(llama_dir, tmp_path / "adapter")
    reason = (r"\(method row-norm-lora\) scales each output row by its base weight's norm, which vLLM's LoRA "
              r"cannot serve; serve it with --engine torch")
    with pytest.raises(AdapterLoadError, match=reason):
        prepare(tmp_path / "adapter", base_shapes(llama_dir), 16, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(AdapterLoadError, match=reason):
        derived_max_lora_rank(llama_dir, {"dora": str(tmp_path / "adapter")})


def greedy(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=3)[0, len(prompt):].tolist()


@pytest.mark.parametrize("base", ["llama_dir", "biased_gpt2_dir"])
def test_one_torch_engine_serves_row_norm_plain_and_base_rows_in_the_same_steps(base, request, tmp_path):
    """Nine requests at once on five adapter names (the row-norm folder loaded three times, the gain one twice:
    five slots) and the base model, so decode steps hold rows of all three kinds in more runs than the per-run
    path takes (the padded layout); prompts are prefilled run by run; a long prompt on the row-norm adapter
    alone runs on the merged weight. Every stream equals its unmerged model's greedy tokens."""
    from ftserve.engine.base import GenerationRequest, SamplingParams
    from ftserve.engine.torch import TorchEngine

    base_dir = request.getfixturevalue(base)
    models = {"row": saved_row_norm_adapter(base_dir, tmp_path / "row"),
              "gain": saved_gain_adapter(base_dir, tmp_path / "gain").eval(),
              None: AutoModelForCausalLM.from_pretrained(base_dir).eval()}
    names = ["row-a", "gain-a", None, "row-b", "gain-b", None, "row-c", "gain-a", "row-a"]
    prompts = [[1, 5 + i, 6, 7 + 2 * i, 8, 9][: 3 + i % 4] for i in range(len(names))]
    long_prompt = [1] + [(7 * i) % 200 + 10 for i in range(140)]
    new_tokens = 8
    expected = [greedy(models[n and n[:-2]], p, new_tokens) for n, p in zip(names, prompts)]
    expected_long = greedy(models["row"], long_prompt, new_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def serve():
        async with TorchEngine.from_pretrained(base_dir) as engine:
            for name in sorted({n for n in names if n}):
                await engine.load_adapter(name, str(tmp_path / name[:-2]))

            async def tokens(prompt, adapter):
                request = GenerationRequest(prompt, adapter=adapter, params=params)
                return [t async for chunk in engine.generate(request) for t in chunk.token_ids]

            alone = await tokens(long_prompt, "row-a")
            mixed = await asyncio.gather(*[tokens(p, n) for p, n in zip(prompts, names)])
            return alone, list(mixed)

    alone, mixed = asyncio.run(serve())
    assert alone == expected_long
    assert mixed == expected
