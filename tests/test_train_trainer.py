"""Every method inside transformers' Trainer and TRL's SFTTrainer (ftserve/train/trainer.py): the loss falls, the
method's rules hold (its optimizer groups, Delta-LoRA's snapshot after step K+1, LoRA-FA's frozen A), checkpoints
hold the adapter alone and resume to the same adapter and optimizer state as an uninterrupted run, and gradient
checkpointing with bf16 autocast trains."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open

from ftserve import FineTuningConfig, FineTuningModel, load_adapter
from ftserve.errors import ConfigError
from ftserve.train import AdapterTrainer, adapter_sft_trainer

from support.cases import METHODS, start_step
from support.models import logits, small_llama
from support.training import toy_dataset, toy_loss
from support.training import trainer_arguments as arguments

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2  # Delta-LoRA's start step: W moves from step K+1 on
LR = 1e-2  # as support.training.trainer_arguments
STEPS = 6  # as support.training.trainer_arguments


def adapter(method: str, base=None) -> FineTuningModel:
    """Rank 8 (16 without a scale: VeRA, whose vectors also want a larger step, as in PEFT's examples)."""
    chosen = FineTuningConfig(method=method).adapter_method
    rank = 8 if chosen.has_scale else 16
    vectors = {"d_initial": 1.0} if "d_initial" in chosen.option_defaults else {}  # VeRA's d: a larger start
    config = FineTuningConfig(method=method, lora_r=rank, lora_alpha=2 * rank, **start_step(method, K), **vectors,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    return FineTuningModel(base if base is not None else small_llama(), config)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def adapter_tensors(model: FineTuningModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t.detach().clone() for name, layer in model.adapter_layers.items()
            for key, t in layer.adapter_state().items()}


def frozen_adapter_tensors(model: FineTuningModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t.detach().clone() for name, layer in model.adapter_layers.items()
            for key, t in layer.named_parameters() if not key.startswith("base_layer.") and not t.requires_grad}


def assert_rules_held(trainer, model: FineTuningModel, frozen_before: dict[str, torch.Tensor]) -> None:
    # The optimizer's groups are the method's (LoRA+: B at lr * ratio): same tensors, same starting rates.
    expected = model.param_groups(LR)
    got = trainer.optimizer.param_groups
    assert [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in expected]
    assert [g.get("initial_lr", g["lr"]) for g in got] == [g["lr"] for g in expected]
    # The after-step rule ran once per optimizer step: a snapshotting method holds its snapshot after step K+1.
    assert model.steps_done == STEPS
    for layer in model.adapter_layers.values():
        assert set(model.method.snapshot_keys) <= set(layer.adapter_state())
    # Frozen adapter tensors (LoRA-FA's A) are where they started.
    for key, tensor in frozen_before.items():
        torch.testing.assert_close(frozen_adapter_tensors(model)[key], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_lowers_the_loss_follows_the_method_and_saves_a_reloadable_adapter(method, tmp_path):
    model = adapter(method)
    frozen = frozen_adapter_tensors(model)
    before = toy_loss(model)
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path / "run"), train_dataset=toy_dataset())
    trainer.train()
    assert toy_loss(model) < before - 0.05, (before, losses(trainer))
    assert_rules_held(trainer, model, frozen)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = load_adapter(small_llama(), tmp_path / "final")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert reloaded.steps_done == STEPS


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_holds_only_the_adapter_and_resumes_to_the_uninterrupted_run(method, tmp_path):
    data = toy_dataset()
    straight = adapter(method)
    first = AdapterTrainer(model=straight, args=arguments(tmp_path / "a", save_strategy="steps", save_steps=K + 2),
                           train_dataset=data)
    first.train()
    checkpoint = tmp_path / "a" / f"checkpoint-{K + 2}"
    keys = []
    for weights in checkpoint.glob("*.safetensors"):
        with safe_open(weights, "pt") as f:
            keys += list(f.keys())
    assert keys and all(".lora_" in k or ".vera_" in k or k.startswith("base_model.vera_") for k in keys), keys
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*"))

    resumed = adapter(method)
    trainer = AdapterTrainer(model=resumed, args=arguments(tmp_path / "b"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == STEPS and resumed.steps_done == STEPS
    for key, tensor in adapter_tensors(straight).items():
        torch.testing.assert_close(adapter_tensors(resumed)[key], tensor, rtol=1e-6, atol=1e-7, msg=key)
    expected, got = first.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert expected.keys() == got.keys()
    for index, state in expected.items():
        assert got[index]["step"] == state["step"] == STEPS
        torch.testing.assert_close(got[index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_resuming_with_another_method_says_so(tmp_path):
    AdapterTrainer(model=adapter("lora"), args=arguments(tmp_path / "a", max_steps=2, save_strategy="steps",
                                                          save_steps=2), train_dataset=toy_dataset()).train()
    trainer = AdapterTrainer(model=adapter("lora-fa"), args=arguments(tmp_path / "b"), train_dataset=toy_dataset())
    with pytest.raises(Exception, match="a lora checkpoint cannot resume a lora-fa run"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


@pytest.mark.parametrize("method", METHODS)
def test_activation_checkpointing_with_bf16_autocast_trains(method, tmp_path):
    model = adapter(method)
    frozen = frozen_adapter_tensors(model)
    trainer = AdapterTrainer(model=model, args=arguments(tmp_path, bf16=True, activation_checkpointing=True),
                             train_dataset=toy_dataset())
    before = toy_loss(model)
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    assert toy_loss(model) < before - 0.05, (before, losses(trainer))
    assert_rules_held(trainer, model, frozen)


@pytest.mark.parametrize("method", METHODS)
def test_trl_sft_trainer_trains_every_method(method, tmp_path):
    from trl import SFTConfig

    from ftserve.testing import build_tokenizer, tiny_llama, toy_sentences

    model = adapter(method, tiny_llama(hidden=64, heads=2, intermediate=128))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
                     lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=STEPS,
                     logging_steps=1, use_cpu=True, disable_tqdm=True, max_length=32)
    frozen = frozen_adapter_tensors(model)
    trainer = adapter_sft_trainer()(model=model, args=args, processing_class=build_tokenizer(),
                                    train_dataset=Dataset.from_dict({"text": toy_sentences(8)}))
    trainer.train()
    curve = losses(trainer)
    assert curve[-1] < curve[0], curve
    assert_rules_held(trainer, model, frozen)
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    assert json.loads((checkpoint / "ftserve_config.json").read_text())["method"] == method
    assert not (checkpoint / "model.safetensors").exists()


def test_an_optimizer_passed_in_gets_the_methods_after_step_rule(tmp_path):
    model = adapter("delta-lora")
    optimizer = torch.optim.SGD(model.param_groups(LR), lr=LR)
    AdapterTrainer(model=model, args=arguments(tmp_path), train_dataset=toy_dataset(),
                   optimizers=(optimizer, None)).train()
    assert model.steps_done == STEPS
    assert all(layer.started for layer in model.adapter_layers.values())


def test_the_trainer_refuses_a_model_that_is_not_a_fine_tuning_model(tmp_path):
    with pytest.raises(ConfigError, match="trains a ftserve FineTuningModel; got LlamaForCausalLM"):
        AdapterTrainer(model=small_llama(), args=arguments(tmp_path))
