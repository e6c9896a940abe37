"""Small models and a tokenizer built locally, offline, in seconds: for quickstart, tests and benchmarks.

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


def save_random_lora(base_model, path: str | os.PathLike, rank: int = 16, seed: int = 0) -> Path:
    """An all-linear LoRA with random nonzero factors (B starts at zero when trained), saved at ``path``:
    adapters that really change outputs, for benchmarks and demos."""
    from .config import FineTuningConfig
    from .model import FineTuningModel

    model = FineTuningModel(base_model, FineTuningConfig(lora_r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 / param.shape[-1] ** 0.5))
    model.save_adapter(path)
    return Path(path)
