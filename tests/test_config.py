"""FineTuningConfig: validation with clear errors, method spellings, per-module rank/alpha (PEFT's suffix rule),
target resolution on a real model, and the adapter_config.json mapping."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from peft.utils.other import get_pattern_key

from ftserve import ConfigError, FineTuningConfig, FineTuningModel
from ftserve.methods import AdapterLayer, get_method

from support.cases import METHODS
from support.models import small_gpt2, small_llama

BAD_VALUES = [
    ("unknown_method", dict(method="qlora"), "unknown method 'qlora'"),
    ("method_not_a_string", dict(method=3), "method must be a string"),
    ("rank_zero", dict(lora_r=0), "lora_r must be an integer >= 1"),
    ("rank_float", dict(lora_r=4.0), "lora_r must be an integer >= 1"),
    ("rank_bool", dict(lora_r=True), "lora_r must be an integer >= 1"),
    ("alpha_negative", dict(lora_alpha=-1), "lora_alpha must be > 0"),
    ("alpha_nan", dict(lora_alpha=math.nan), "lora_alpha must be a finite number"),
    ("dropout_one", dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
    ("dropout_negative", dict(lora_dropout=-0.1), "lora_dropout must be in [0, 1)"),
    ("targets_int", dict(target_modules=5), "target_modules must be a list of module names"),
    ("targets_empty_list", dict(target_modules=[]), "target_modules must be a list of module names"),
    ("targets_non_string_item", dict(target_modules=["q_proj", 1]), "target_modules must be a list"),
    ("targets_empty_string", dict(target_modules="  "), "target_modules is an empty string"),
    ("targets_invalid_regex", dict(target_modules=".*(q_proj"), "target_modules regex '.*(q_proj' is invalid"),
    ("rslora_not_bool", dict(use_rslora="yes"), "use_rslora must be True or False"),
    ("rank_pattern_zero", dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj'] must be > 0"),
    ("rank_pattern_float", dict(rank_pattern={"q_proj": 2.5}), "rank_pattern['q_proj'] must be an integer"),
    ("rank_pattern_not_dict", dict(rank_pattern=["q_proj"]), "rank_pattern must be a dict"),
    ("rank_pattern_bad_regex", dict(rank_pattern={"q_proj(": 4}), "rank_pattern key 'q_proj(' is not a valid regex"),
    ("alpha_pattern_negative", dict(alpha_pattern={"v_proj": -2}), "alpha_pattern['v_proj'] must be > 0"),
    ("loraplus_ratio_zero", dict(method="lora+", loraplus_lr_ratio=0), "loraplus_lr_ratio must be > 0"),
    ("prng_key_negative", dict(method="vera", projection_prng_key=-1), "projection_prng_key must be an integer"),
    ("delta_ratio_negative", dict(method="delta-lora", delta_update_ratio=-1.0), "delta_update_ratio must be >= 0"),
    ("delta_start_negative", dict(method="delta-lora", delta_start_step=-1),
     "delta_start_step must be an integer >= 0"),
    ("vera_with_rank_pattern", dict(method="vera", rank_pattern={"q_proj": 4}), "VeRA shares one rank"),
]


@pytest.mark.parametrize("case, kwargs, message", BAD_VALUES, ids=[case for case, _, _ in BAD_VALUES])
def test_bad_config_value_raises_config_error_naming_it(case, kwargs, message):
    with pytest.raises(ConfigError) as info:
        FineTuningConfig(**kwargs)
    assert message in str(info.value)


def test_config_error_is_a_value_error_for_callers_that_catch_that():
    with pytest.raises(ValueError):
        FineTuningConfig(lora_r=-3)


@pytest.mark.parametrize("spelling, canonical", [
    ("LoRA", "lora"), ("VeRA", "vera"), ("LoRA+", "lora+"), ("loraplus", "lora+"), ("LoRA-Plus", "lora+"),
    ("delta_lora", "delta-lora"), ("Delta-LoRA", "delta-lora"), ("LORA-FA", "lora-fa"), ("lora_fa", "lora-fa"),
])
def test_method_spellings_are_accepted(spelling, canonical):
    assert FineTuningConfig(method=spelling).method == canonical


def test_delta_lora_turns_dropout_off_with_a_warning_as_the_paper_does():
    with pytest.warns(UserWarning, match="Delta-LoRA removes dropout"):
        config = FineTuningConfig(method="delta-lora", lora_dropout=0.05)
    assert config.lora_dropout == 0.0


def test_scale_is_alpha_over_r_and_alpha_over_sqrt_r_with_rslora():
    assert FineTuningConfig(lora_r=16, lora_alpha=32).scale_for("q_proj") == 2.0
    assert FineTuningConfig(lora_r=16, lora_alpha=32, use_rslora=True).scale_for("q_proj") == 8.0
    assert FineTuningConfig(method="vera", lora_r=16, lora_alpha=32).scale_for("q_proj") == 1.0


PATTERN_KEYS = ["layers.1.self_attn.q_proj", "q_proj", "mlp\\..*_proj", "proj"]
MODULE_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                "model.layers.11.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj", "q_proj", "model.layers.0.xq_proj"]


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_rank_and_alpha_patterns_resolve_like_peft(module_name):
    """PEFT's rule (first key in order whose regex matches a '.'-bounded suffix), with PEFT as the oracle."""
    ranks = {key: i + 2 for i, key in enumerate(PATTERN_KEYS)}
    alphas = {key: float(10 * (i + 1)) for i, key in enumerate(PATTERN_KEYS)}
    config = FineTuningConfig(lora_r=8, lora_alpha=16, rank_pattern=ranks, alpha_pattern=alphas)
    key = get_pattern_key(list(ranks), module_name)
    assert config.rank_for(module_name) == ranks.get(key, 8)
    assert config.alpha_for(module_name) == alphas.get(key, 16.0)
    assert config.scale_for(module_name) == alphas.get(key, 16.0) / ranks.get(key, 8)


def test_pattern_suffix_rule_by_hand():
    config = FineTuningConfig(lora_r=8, rank_pattern={"layers.1.self_attn.q_proj": 2, "proj": 3})
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.11.self_attn.q_proj") == 8  # "proj" needs a '.' boundary
    assert config.rank_for("model.layers.0.mlp.proj") == 3


def test_rank_pattern_sets_each_layers_rank_in_the_model():
    config = FineTuningConfig(lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                              rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    model = FineTuningModel(small_llama(), config)
    ranks = {name: layer.lora_A.weight.shape[0] for name, layer in model.adapter_layers.items()}
    scales = {name: layer.scale for name, layer in model.adapter_layers.items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4,
                     "model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 2}
    assert scales == {"model.layers.0.self_attn.q_proj": 0.75, "model.layers.0.self_attn.v_proj": 2.0,
                      "model.layers.1.self_attn.q_proj": 0.75, "model.layers.1.self_attn.v_proj": 4.0}


# Targets on a real model -------------------------------------------------------------------------------

def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({name: type(m) for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def test_targets_matching_nothing_list_the_models_linear_layers():
    base = small_llama()
    before = _snapshot(base)
    with pytest.raises(ConfigError) as info:
        FineTuningModel(base, FineTuningConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "match no module" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    assert _snapshot(base) == before


def test_regex_target_matching_nothing_is_refused():
    with pytest.raises(ConfigError, match="match no module"):
        FineTuningModel(small_llama(), FineTuningConfig(target_modules=r".*\.attn\.c_attn"))


def test_target_on_a_non_linear_module_names_its_type():
    base = small_llama()
    before = _snapshot(base)
    with pytest.raises(ConfigError) as info:
        FineTuningModel(base, FineTuningConfig(target_modules=["input_layernorm"]))
    assert "LlamaRMSNorm, not a linear layer" in str(info.value)
    assert _snapshot(base) == before


def test_regex_and_all_linear_targets_resolve():
    by_regex = FineTuningModel(small_llama(), FineTuningConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert sorted(by_regex.adapter_layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    every = FineTuningModel(small_gpt2(), FineTuningConfig(target_modules="all-linear"))
    assert len(every.adapter_layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj; the lm_head is left out
    assert "lm_head" not in every.adapter_layers


def test_default_targets_follow_peft_per_model_type():
    assert sorted(n.rsplit(".", 1)[-1] for n in FineTuningModel(small_llama(), FineTuningConfig()).adapter_layers) \
        == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert sorted(FineTuningModel(small_gpt2(), FineTuningConfig()).adapter_layers) \
        == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_wrapping_a_wrapped_model_is_refused():
    base = small_llama()
    FineTuningModel(base, FineTuningConfig(target_modules=["q_proj"]))
    assert any(isinstance(m, AdapterLayer) for m in base.modules())
    with pytest.raises(ConfigError, match="already carries ftserve adapter layers"):
        FineTuningModel(base, FineTuningConfig(target_modules=["v_proj"]))


def test_config_must_be_a_finetuning_config():
    with pytest.raises(ConfigError, match="config must be a FineTuningConfig"):
        FineTuningModel(small_llama(), {"method": "lora"})


# adapter_config.json --------------------------------------------------------------------------------

def other_value(default):
    """A valid value of a setting that differs from its default."""
    if isinstance(default, bool):
        return not default
    return default + 3 if isinstance(default, int) else default * 0.5 + 0.25


@pytest.mark.parametrize("method", METHODS)
def test_peft_dict_round_trip_keeps_every_setting(method):
    chosen = get_method(method)
    patterns = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4.0}) if chosen.has_scale else {}
    settings = {name: other_value(default) for name, default in chosen.option_defaults.items()}
    config = FineTuningConfig(method=method, lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                              use_rslora=chosen.has_scale, **settings, **patterns)
    assert {name: getattr(config, name) for name in settings} == settings
    data = config.to_peft_dict(["q_proj", "v_proj"], fan_in_fan_out=False)
    assert data["peft_type"] == chosen.peft_type
    back = FineTuningConfig.from_peft_dict(data)
    assert back.method == method and back.lora_r == 4 and back.target_modules == ["q_proj", "v_proj"]
    assert back.method_options == settings
    if chosen.has_scale:
        assert (back.lora_alpha, back.use_rslora, back.rank_pattern, back.alpha_pattern) == \
            (8, True, {"v_proj": 2}, {"v_proj": 4.0})


@pytest.mark.parametrize("method", METHODS)
def test_a_setting_of_another_method_is_refused_naming_its_owner(method):
    others = [(m, name) for m in METHODS if m != method for name in get_method(m).option_defaults
              if name not in get_method(method).option_defaults]
    for owner, name in others:
        with pytest.raises(ConfigError, match=f"{name} is a setting of {re.escape(owner)}, not of "
                                              f"{re.escape(method)}"):
            FineTuningConfig(method=method, **{name: get_method(owner).option_defaults[name]})
    with pytest.raises(ConfigError, match="lora_rank is not a setting of any method"):
        FineTuningConfig(method=method, lora_rank=4)


def test_a_setting_reads_and_writes_as_an_attribute_and_replace_keeps_only_the_new_methods():
    config = FineTuningConfig(method="delta-lora", delta_start_step=3)
    config.delta_start_step = 7
    assert config.method_options == {"delta_update_ratio": 2.0, "delta_start_step": 7}
    assert config.replace(lora_r=4).delta_start_step == 7
    plain = config.replace(method="lora")
    assert plain.method_options == {}
    with pytest.raises(AttributeError, match="delta_start_step is a setting of delta-lora; this config's method "
                                             "is lora"):
        plain.delta_start_step
    assert FineTuningConfig.from_dict(dataclasses.asdict(config)) == config


def test_a_config_saved_by_an_older_version_with_every_methods_fields_still_reads():
    old = {"method": "lora+", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "target_modules": None,
           "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "loraplus_lr_ratio": 4.0,
           "projection_prng_key": 0, "d_initial": 0.1, "save_projection": True, "delta_update_ratio": 2.0,
           "delta_start_step": 500, "base_model_name_or_path": None, "method_options": {}}
    assert FineTuningConfig.from_dict(old) == FineTuningConfig(method="lora+", lora_r=4, lora_alpha=8.0,
                                                               loraplus_lr_ratio=4.0)


@pytest.mark.parametrize("data, message", [
    ({"r": 4}, "has no 'peft_type'"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"peft_type": "VERA", "r": 8, "use_dora": True}, "sets use_dora: true, which a VeRA adapter"),
    ({"peft_type": "LORA", "bias": "all"}, "bias='all'"),
    ({"peft_type": "LORA", "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "LORA", "r": 0}, "lora_r must be an integer >= 1"),
])
def test_unsupported_peft_configs_are_refused(data, message):
    with pytest.raises(ConfigError) as info:
        FineTuningConfig.from_peft_dict(data)
    assert message in str(info.value)
