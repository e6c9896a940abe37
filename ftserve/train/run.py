"""One ``ftserve train`` run on transformers' Trainer: check everything, train, write the adapter folder whole.

Order matters for the user: every input is checked (settings, output folder, data row by row, the method's
settings) before the base model is loaded, so a mistake costs seconds, not a training run. Checkpoints go to
``OUTPUT.checkpoints/`` beside the output; the output folder (adapter, tokenizer, model card, loss curves, log)
appears by one rename at the end. Ctrl-C (or SIGTERM) stops within moments and keeps the last completed step
as a checkpoint (``interrupt``); ``--resume`` continues from the last complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, ConfigError, FtserveError, ServingError
from ..files.adapter_folder import SETTINGS
from ..files.atomic import OUTPUT_FILE_MODE, atomic_output_dir
from . import data as training_data
from .settings import TrainSettings

COMPLETE = "trainer_state.json"  # the trainer writes it last: a checkpoint folder that holds it is whole
DEPLOY_TIMEOUT_S = 120  # the server reads and checks the whole adapter before it answers
ERROR_EXCERPT = 200  # characters of a refusal's body quoted when it is not the server's JSON error


class Interrupted(FtserveError):
    """Training was stopped by Ctrl-C or SIGTERM; the message says how to resume."""


@dataclass
class Inputs:
    """What the checks produced: the tokenizer and the tokenised data, ready to train on."""

    tokenizer: Any
    train: training_data.Prepared
    eval: training_data.Prepared | None
    resume: str | None
    checkpoints: Path


def checkpoints_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.checkpoints"


def last_complete_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name[11:].isdigit()]
    return max(found, key=lambda p: int(p.name[11:]), default=None)


def check_inputs(settings: TrainSettings, echo: Callable[[str], None]) -> Inputs:
    """Everything that can be wrong before training, each with a one-line error; writes nothing."""
    output = Path(settings.output)
    if output.exists() and not settings.force:
        raise ConfigError(f"{output} already exists; pass --force to replace it")
    checkpoints = checkpoints_dir(output)
    resume = None
    if settings.resume:
        if settings.resume == "latest":
            found = last_complete_checkpoint(checkpoints)
            if found is None:
                raise CheckpointError(f"--resume: {checkpoints} holds no complete checkpoint to resume from")
            resume = str(found)
        elif not (Path(settings.resume) / COMPLETE).is_file():
            raise CheckpointError(f"--resume {settings.resume}: not a complete checkpoint folder (no {COMPLETE})")
        else:
            resume = settings.resume
    elif last_complete_checkpoint(checkpoints) is not None and not settings.force:
        raise ConfigError(f"{checkpoints} holds the checkpoints of an earlier run: pass --resume to continue it, "
                          f"or --force to start again")
    settings.adapter_config()  # a setting the method does not have, a bad rank, ...
    if settings.chat_template and not Path(settings.chat_template).is_file():
        raise ConfigError(f"--chat-template {settings.chat_template}: no such file")
    tokenizer = load_tokenizer(settings)
    train = _prepared(settings.data, tokenizer, settings.max_seq_len)
    evaluation = _prepared(settings.eval_data, tokenizer, settings.max_seq_len) if settings.eval_data else None
    if evaluation is not None and evaluation.shape != train.shape:
        echo(f"note: the eval rows are {evaluation.shape} rows, the training rows {train.shape} rows")
    for note in train.notes:
        echo(f"note: {note}")
    return Inputs(tokenizer, train, evaluation, resume, checkpoints)


def _prepared(source: str, tokenizer, max_seq_len: int) -> training_data.Prepared:
    return training_data.prepare(training_data.load_rows(source), tokenizer, max_seq_len)


def load_tokenizer(settings: TrainSettings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.base)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{settings.base}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if settings.chat_template:
        tokenizer.chat_template = Path(settings.chat_template).read_text(encoding="utf-8")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss either way
    return tokenizer


def training_arguments(settings: TrainSettings, checkpoints: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    evaluate = {"eval_strategy": "steps" if settings.eval_steps else "epoch",
                "per_device_eval_batch_size": settings.batch_size} if has_eval else {}
    if settings.eval_steps:
        evaluate["eval_steps"] = settings.eval_steps
    return TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        learning_rate=settings.lr, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # transformers reads a float below 1 as a fraction of the steps
        weight_decay=settings.weight_decay, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, activation_checkpointing=settings.gradient_checkpointing,
        bf16=settings.bf16, seed=settings.seed, data_seed=settings.seed, logging_steps=settings.logging_steps,
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        report_to=[], disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        **evaluate)


def train(settings: TrainSettings, echo: Callable[[str], None] = print, callbacks: tuple = ()) -> Path | None:
    """Run ``settings`` to the end; returns the output folder (None in the other processes of a run launched
    by torchrun or accelerate, where the first process alone writes and speaks). Raises Interrupted on Ctrl-C /
    SIGTERM, once the last completed step is kept as a checkpoint. ``callbacks`` are further ``TrainerCallback``s
    for the trainer."""
    if not is_main_process():
        echo = _silent
    inputs = check_inputs(settings, echo)
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, set_seed

    from ..model import FineTuningModel
    from .quantized import load_base_model, quantized_base_record
    from .report import Progress

    rows = inputs.train.rows
    eval_rows = inputs.eval.rows if inputs.eval else None
    if settings.packing:
        rows = training_data.pack(rows, settings.max_seq_len)
    train_set = Dataset.from_list(rows)
    if settings.eval_fraction:
        split = train_set.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
        train_set, eval_set = split["train"], split["test"]
    else:
        eval_set = Dataset.from_list(eval_rows) if eval_rows else None

    base = load_base_model(settings.base, load_in_4bit=settings.load_in_4bit)
    quantized = quantized_base_record(base) if settings.load_in_4bit else None
    set_seed(settings.seed)  # the adapter's initial tensors too: one seed, one run
    model = FineTuningModel(base, settings.adapter_config())
    trainable, total = model.trainable_parameters()
    echo(f"{settings.method} on {settings.base}: {trainable:,d} trainable parameters of {total:,d}; "
         f"{len(train_set)} training rows ({inputs.train.shape}, {inputs.train.tokens:,d} tokens)"
         + (f", {len(eval_set)} eval rows" if eval_set is not None else ""))
    from .interrupt import StopAtTheLastStep, StopRequested
    from .trainer import AdapterTrainer

    stop = StopAtTheLastStep(echo)
    trainer = AdapterTrainer(
        model=model, args=training_arguments(settings, inputs.checkpoints, eval_set is not None),
        train_dataset=train_set, eval_dataset=eval_set, processing_class=inputs.tokenizer,
        data_collator=DataCollatorForSeq2Seq(inputs.tokenizer, padding=True, label_pad_token_id=training_data.IGNORE),
        callbacks=[Progress(echo), stop, *callbacks])
    trainer.remove_callback(PrinterCallback)  # Progress prints instead
    if inputs.resume is None:  # starting again (--force, or an earlier run that kept nothing): no stale step
        shutil.rmtree(inputs.checkpoints, ignore_errors=True)
    started = time.monotonic()
    try:
        with stop.handling_signals():
            try:
                trainer.train(resume_from_checkpoint=inputs.resume)
                history = trainer.state.log_history
                if eval_set is not None and not any("eval_loss" in e and e["step"] == trainer.state.global_step
                                                    for e in history):
                    trainer.evaluate()
            except StopRequested:
                stop.keep_last_step(trainer)  # a second Ctrl-C still cuts this short
                raise interrupted(inputs.checkpoints, trainer.state.global_step) from None
    except KeyboardInterrupt:  # the second Ctrl-C
        raise interrupted(inputs.checkpoints, trainer.state.global_step, at_once=True) from None
    if not (trainer.is_world_process_zero() and is_main_process()):  # a launcher's other processes
        return None
    final = {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch or 0.0,
             "runtime": time.monotonic() - started, "log_history": trainer.state.log_history}
    data_summary = {"train": settings.data, "shape": inputs.train.shape, "rows": inputs.train.total,
                    "truncated": inputs.train.truncated, "tokens": inputs.train.tokens, "packing": settings.packing,
                    "eval": settings.eval_data or (f"{settings.eval_fraction:.0%} of the training rows"
                                                   if settings.eval_fraction else None)}
    output = write_output(settings, model, inputs.tokenizer, final, data_summary, quantized)
    shutil.rmtree(inputs.checkpoints, ignore_errors=True)
    return output


def is_main_process() -> bool:
    """The first process of a data-parallel run (torchrun and accelerate set RANK), or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def _silent(line: str) -> None:
    pass


def interrupted(checkpoints: Path, step: int, at_once: bool = False) -> Interrupted:
    """The error that says what an interrupted run kept. A checkpoints folder left with nothing complete in it is
    removed, so that the same command starts afresh instead of taking it for an earlier run."""
    stopped = f"stopped at once at step {step} by a second Ctrl-C" if at_once else f"interrupted at step {step}"
    last = last_complete_checkpoint(checkpoints)
    if last is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
        return Interrupted(f"{stopped}; nothing was kept" + ("" if at_once else " (no step had completed)"))
    return Interrupted(f"{stopped}; the last complete checkpoint is {last}; resume with the same command and "
                       f"--resume")


def write_output(settings: TrainSettings, model, tokenizer, final: dict, data_summary: dict,
                 quantized: dict | None) -> Path:
    """The output folder, whole or not at all: adapter, tokenizer, model card, loss curves, log."""
    from .report import LOG_FILE, LOSS_PLOT, model_card, plot_losses

    output = Path(settings.output)
    with atomic_output_dir(output, force=True) as tmp:
        model.save_adapter(tmp)
        tokenizer.save_pretrained(tmp)
        settings_path = tmp / SETTINGS  # our settings, beside PEFT's adapter_config.json
        ours = json.loads(settings_path.read_text())
        ours["training"] = {"data": data_summary, "global_step": final["global_step"]}
        if quantized:
            ours["quantized_base"] = quantized
        settings_path.write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n")
        (tmp / LOG_FILE).write_text(json.dumps(final["log_history"], indent=1) + "\n")
        plot_losses(final["log_history"], tmp / LOSS_PLOT)
        (tmp / "README.md").write_text(model_card(settings, data_summary, final, output))
        for child in tmp.iterdir():
            child.chmod(OUTPUT_FILE_MODE)
    return output


def deploy(settings: TrainSettings, output: Path) -> str:
    """Load the adapter into a running ``ftserve serve`` (started with --enable-adapter-api) by its load API."""
    import httpx

    name = settings.adapter_name or output.name
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    url = settings.deploy_to.rstrip("/") + "/v1/load_lora_adapter"
    try:
        answer = httpx.post(url, json={"lora_name": name, "lora_path": str(output.resolve())}, headers=headers,
                            timeout=DEPLOY_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ServingError(f"--deploy-to {settings.deploy_to}: cannot reach the server ({exc}); the adapter is "
                           f"in {output}") from None
    if answer.status_code != httpx.codes.OK:
        try:
            detail = answer.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = answer.text[:ERROR_EXCERPT]
        raise ServingError(f"--deploy-to {settings.deploy_to}: the server refused the adapter "
                           f"({answer.status_code}: {detail}); it is in {output}")
    return name
