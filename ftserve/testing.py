"""Small models, a tokenizer and random adapters of every registered method, built locally, offline, in seconds:
for quickstart, tests and benchmarks.

The Llama shape keeps head_dim = 32 (vLLM's CPU attention needs >= 32); the GPT-2 shape exercises Conv1D.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = ("the cat dog bird sees eats runs jumps over under a red blue green small big quick lazy fox "
          "river tree house sun moon star reads writes sings plays with on in and of to from happy sad").split()


def toy_sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE with bos/eos/unk/pad, chat-role tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(toy_sentences(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:],
                                   chat_template=CHAT_TEMPLATE)


def tiny_llama(vocab_size: int = 1000, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
               intermediate: int = 256, dtype: torch.dtype = torch.float32, tie: bool = False,
               kv_heads: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(vocab_size: int = 1000, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return GPT2LMHeadModel(config).eval()


def save_tiny_model(path: str | os.PathLike, kind: str = "llama", **kwargs) -> Path:
    """Write a tiny model and the tokenizer as a Hugging Face folder (what `from_pretrained` reads)."""
    path = Path(path)
    model = tiny_llama(**kwargs) if kind == "llama" else tiny_gpt2(**kwargs)
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@torch.no_grad()
def randomise_adapter(model, seed: int, std: float = 0.1, fan_in: bool = False) -> None:
    """Fill every adapter tensor of a ``FineTuningModel`` with seeded noise, so that B / lambda_b are no longer
    zero. Its standard deviation is ``std``, or with ``fan_in`` std / sqrt(the tensor's last dimension), so that
    a wide layer's delta is no larger than a narrow one's."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.adapter_parameters():
        scale = std / param.shape[-1] ** 0.5 if fan_in else std
        param.copy_(torch.randn(param.shape, generator=generator) * scale)


def random_adapter(base, config, seed: int = 0, std: float = 0.5, fan_in: bool = False):
    """A ``FineTuningModel`` of ``config`` over ``base`` (a model or a Hugging Face folder) with every adapter
    tensor random (see ``randomise_adapter``): an adapter that really changes outputs. A method with a frozen
    snapshot (Delta-LoRA's start factors) snapshots the draw of ``seed`` and then takes that of ``seed + 1``,
    so that the snapshot and the factors differ."""
    from .model import FineTuningModel

    if not isinstance(base, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base)
    model = FineTuningModel(base, config)
    randomise_adapter(model, seed, std, fan_in)
    snapshot = set(model.method.snapshot_keys)
    if snapshot:
        for layer in model.adapter_layers.values():
            layer.prepare_for_state(snapshot)
        randomise_adapter(model, seed + 1, std, fan_in)
    return model


def save_random_adapter(base, method: str, path: str | os.PathLike, seed: int = 0, std: float = 0.5,
                        fan_in: bool = False, rank: int | None = None,
                        targets: str | list[str] = ("q_proj", "v_proj", "down_proj"), **settings) -> Path:
    """A ``random_adapter`` of any registered ``method`` saved at ``path``, for tests, benchmarks and demos.

    ``rank`` defaults to 16 for a method without a scale (VeRA, whose shared pair needs the larger rank) and 8
    for the rest, with alpha = 2 * rank; ``settings`` are further ``FineTuningConfig`` fields.
    """
    from .config import FineTuningConfig
    from .methods import METHODS

    rank = rank or (8 if METHODS[method].has_scale else 16)
    targets = targets if isinstance(targets, str) else list(targets)
    config = FineTuningConfig(method=method, lora_r=rank, target_modules=targets,
                              **{"lora_alpha": 2 * rank, **settings})
    random_adapter(base, config, seed, std, fan_in).save_adapter(path)
    return Path(path)


def save_random_lora(base_model, path: str | os.PathLike, rank: int = 16, seed: int = 0) -> Path:
    """An all-linear LoRA with random nonzero factors, for benchmarks and demos (see ``save_random_adapter``)."""
    return save_random_adapter(base_model, "lora", path, seed, std=0.5, fan_in=True, rank=rank, targets="all-linear")


def peft_dora_model(base, rank: int = 8, seed: int = 0, std: float = 0.5, targets: str | list[str] = "all-linear"):
    """A DoRA adapter (arXiv:2402.09353) as PEFT itself builds it (``LoraConfig(use_dora=True)``), over ``base``
    (a model, changed in place, or a Hugging Face folder), for tests and benchmarks: its factors A and B drawn as
    ``randomise_adapter`` draws them with ``fan_in``, so that it changes outputs, and each magnitude m PEFT's own
    start ``||W||_row``, so that the row scale ``r = m / ||W + s B A||_row`` differs from one and from row to row.
    ``save_pretrained`` writes PEFT's DoRA folder."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(base, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (std / param.shape[-1] ** 0.5))
    return model
