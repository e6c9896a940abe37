"""Models whose greedy answer is known in advance, and reading a streamed answer back with its logprobs."""

from __future__ import annotations

from pathlib import Path

import torch

from ftserve.testing import build_tokenizer, tiny_llama


def save_successor_model(path: Path, successor: dict[int, int]) -> Path:
    """A tiny Llama (head_dim 32) and the tests' tokenizer whose greedy next token after ``t`` is
    ``successor[t]``: the layers add nothing to the residual stream (o_proj and down_proj are zero), each
    key's embedding is its own unit vector and the output head maps it to its successor by a wide margin, so
    a chain of successors is an answer the model says word for word, on any engine."""
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
