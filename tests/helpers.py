"""Shared test utilities: small models, a fixed toy batch, randomised adapters, closed-form parameter counts.

Everything here is deterministic: every random draw goes through a seeded ``torch.Generator``, a seed the test sets, or
``ftserve.testing``'s seeded builders.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch
from torch import nn

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.methods import METHODS as REGISTRY
from ftserve.methods import AdapterMethod
from ftserve.testing import random_adapter, randomise_adapter, save_random_adapter, tiny_gpt2, tiny_llama

__all__ = ["randomise_adapter"]  # re-exported: the in-memory half of ftserve.testing.save_random_adapter

METHODS = tuple(REGISTRY)  # the built-in methods, as registered when the tests start

FP32 = dict(atol=2e-5, rtol=1e-5)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for test subprocesses; conftest's one_thread says why
IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))  # for the conftest-sized models


def case_settings(method: AdapterMethod) -> dict:
    """Small settings for ``method``: rank 4, alpha 8; rank 16 for a method without a scale (VeRA, whose shared
    pair is sliced per layer)."""
    return dict(method=method.name, lora_r=4, lora_alpha=8) if method.has_scale else dict(method=method.name,
                                                                                         lora_r=16)


# The case matrix, (case name, model kind, FineTuningConfig settings): every registered method, plus rsLoRA's
# other scale, on a Llama- and a GPT-2-shaped model (``tiny_model``). Every generic check runs over these rows.
CASES = [(name, case_settings(method)) for name, method in REGISTRY.items()]
CASES += [("lora-rslora", dict(method="lora", lora_r=4, lora_alpha=8, use_rslora=True))]
KINDS = ("llama", "gpt2")
ROWS = [(name, kind, settings) for kind in KINDS for name, settings in CASES]
ROW_IDS = [f"{kind}-{name}" for name, kind, _ in ROWS]


def start_step(method: str, step: int) -> dict:
    """Delta-LoRA's ``delta_start_step`` as a setting, for a method that has it (its default, 500, lies past
    every test's run), else nothing: a setting of another method is refused."""
    return {"delta_start_step": step} if "delta_start_step" in REGISTRY[method].option_defaults else {}


def tiny_model(kind: str) -> nn.Module:
    """The conftest-sized model of ``kind``: Llama (vocab 1000, hidden 128) or GPT-2 (Conv1D, hidden 64)."""
    return tiny_llama() if kind == "llama" else tiny_gpt2()


def trained(base: nn.Module, settings: dict, seed: int = 0, targets="all-linear") -> FineTuningModel:
    """An adapter with random, non-zero tensors (LoRA's B starts at zero, which would hide bugs), in eval mode."""
    return random_adapter(base, FineTuningConfig(target_modules=targets, **settings), seed, std=0.05).eval()


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path: to show that a folder was not touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# A cheap "memorise these sequences" task: each row repeats a cycle, so every token has one successor.
TOY_IDS = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17] * 2, [40, 41, 42, 43, 44, 45, 46, 47] * 2])


def small_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Llama smaller than the conftest one (vocab 256, hidden 64), for tests that take many steps."""
    return tiny_llama(vocab_size=256, hidden=64, heads=2, intermediate=128, dtype=dtype)


def small_gpt2() -> nn.Module:
    """A GPT-2 with Conv1D projections (vocab 256, hidden 32)."""
    return tiny_gpt2(vocab_size=256, hidden=32)


# (builder, targets): Llama's down_proj and GPT-2's two c_proj have other input sizes than the rest, and
# GPT-2's c_attn another output size, so VeRA's shared pair is sliced differently per layer.
MODELS = {
    "llama": (small_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (small_gpt2, ["c_attn", "c_proj"]),
}


def target_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module whose name ends with a target, read off the weights of the bare model.

    nn.Linear stores (d_out, d_in); GPT-2's Conv1D stores (d_in, d_out).
    """
    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            rows, cols = module.weight.shape
            shapes[name] = (rows, cols) if isinstance(module, nn.Linear) else (cols, rows)
    return shapes


def closed_form_trainable(method: str, r: int, shapes: dict[str, tuple[int, int]]) -> int:
    """LoRA / LoRA+ / Delta-LoRA: sum r (d_in + d_out); LoRA-FA: sum r d_out (A frozen); VeRA: sum (r + d_out)."""
    if method == "lora-fa":
        return sum(r * d_out for d_out, _ in shapes.values())
    if method == "vera":
        return sum(r + d_out for d_out, _ in shapes.values())
    return sum(r * (d_in + d_out) for d_out, d_in in shapes.values())


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


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = TOY_IDS) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


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


class ServerProcess:
    """``ftserve serve ...`` in a subprocess on a free loopback port, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
        self.args, self.log, self.env = args, log, {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.cwd = cwd
        self._start()

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = list(self.args)
        # FTSERVE_TEST_PREFIX_CACHING=0 (conftest.py) reaches an engine in this process only; a server the test
        # did not give either flag gets it off as well.
        if os.environ.get("FTSERVE_TEST_PREFIX_CACHING") == "0" and not any("prefix-caching" in a for a in args):
            args.append("--no-enable-prefix-caching")
        cmd = [sys.executable, "-c", "from ftserve.cli import main; main()", "serve", *args,
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline, retries = time.monotonic() + timeout, 2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text()
                if "address already in use" in log and retries:  # another process took the free port first
                    retries -= 1
                    self._start()
                    continue
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Engine tests ------------------------------------------------------------------------------------------

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 100, 200, 300, 400, 500, 600, 700, 800]]
NEW = 8


def write_random_adapter(base_dir, out, method: str, seed: int, r: int = 4, targets="all-linear") -> Path:
    """An adapter of ``method`` whose every tensor is random (Delta-LoRA: after its start snapshot, so it exports
    rank 2r) at a scale that changes greedy tokens, so that a row served with the wrong adapter, or none, is
    caught."""
    return save_random_adapter(base_dir, method, out, seed, std=0.6, fan_in=True, rank=r, targets=targets)


def references(base_dir, adapter_dir, prompts, new=NEW, merged=False) -> list[list[int]]:
    """Greedy tokens of each request alone: FineTuningModel with the adapter unmerged (or merged), no engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = FineTuningModel.from_pretrained(model, adapter_dir)
        if merged:
            model = model.merge_and_unload()
    outs = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=3) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


def greedy(max_tokens=NEW, **kw):
    from ftserve.engine.base import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, request) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    async for chunk in engine.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
    return ids, text, finish


def save_successor_model(path: Path, successor: dict[int, int]) -> Path:
    """A tiny Llama (head_dim 32) and the tests' tokenizer whose greedy next token after ``t`` is
    ``successor[t]``: the layers add nothing to the residual stream (o_proj and down_proj are zero), each
    key's embedding is its own unit vector and the output head maps it to its successor by a wide margin, so
    a chain of successors is an answer the model says word for word, on any engine."""
    from ftserve.testing import build_tokenizer, tiny_llama

    model = tiny_llama()
    hidden = model.config.hidden_size
    if len(successor) > hidden:
        raise ValueError(f"at most {hidden} successor entries")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed.zero_()
        head.zero_()
        for k, (token, nxt) in enumerate(successor.items()):
            embed[token, k] = 1.0
            head[nxt, k] = 10.0
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


MULTI_BYTE_ANSWER = "é€ж中😀"  # 2, 3, 2, 3 and 4 bytes: each byte is a token of the tests' tokenizer


def save_multi_byte_model(path: Path) -> Path:
    """A successor model whose greedy chat answer (after ``<|assistant|>``) is MULTI_BYTE_ANSWER, then eos."""
    from ftserve.testing import build_tokenizer

    tokenizer = build_tokenizer()
    chain = [tokenizer.convert_tokens_to_ids("<|assistant|>"),
             *tokenizer(MULTI_BYTE_ANSWER, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain) and len(chain) == len(MULTI_BYTE_ANSWER.encode()) + 2, chain
    return save_successor_model(path, dict(zip(chain, chain[1:])))


def streamed_chat_bytes(client, model: str) -> tuple[str, bytes, list[str]]:
    """The streamed chat answer of a multi-byte model: its text, its logprobs' ``bytes`` joined, the tokens."""
    text, joined, tokens = "", b"", []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "say it"}],
                                                max_tokens=32, temperature=0, logprobs=True, top_logprobs=2,
                                                stream=True):
        if not chunk.choices:
            continue
        text += chunk.choices[0].delta.content or ""
        for entry in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else None) or []:
            joined += bytes(entry.bytes)
            tokens.append(entry.token)
            assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in entry.top_logprobs)
    return text, joined, tokens


# Training through transformers' Trainer -------------------------------------------------------------

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
