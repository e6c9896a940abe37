"""Training in tests: the guide's plain loop, the toy task through transformers' Trainer, and the bytes autograd
saves for backward."""

from __future__ import annotations

import torch
from torch import nn

from .models import TOY_IDS


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """The guide's plain loop on one fixed batch; returns the loss of every step."""
    model.train()
    losses = []
    for _ in range(steps):
        outputs = model(input_ids=ids, labels=ids)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
    return losses


def saved_activation_bytes(module: nn.Module, fn) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, counted once per storage, parameters and
    buffers of ``module`` excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()  # kept alive while counting, so no saved storage is freed and its address reused
    total = sum(seen.values())
    del result
    return total


@torch.no_grad()
def toy_loss(model) -> float:
    """The loss on the whole toy batch, in eval mode: what training should lower."""
    was_training = model.training
    model.eval()
    loss = model(input_ids=TOY_IDS, labels=TOY_IDS).loss.item()
    model.train(was_training)
    return loss


def toy_dataset():
    """TOY_IDS four times, as a datasets.Dataset of input_ids and labels."""
    from datasets import Dataset

    rows = TOY_IDS.tolist() * 4
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def trainer_arguments(out, **changes):
    """TrainingArguments for a few steps on the toy batch, on CPU, saving nothing unless told."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                    lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=1,
                    use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **changes})
