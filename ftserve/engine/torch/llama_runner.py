"""Llama-family models (Llama, Mistral, Qwen2, Qwen3) on the shared step and KV cache of runner.py.

The model's own modules run embeddings, RMSNorms, RoPE, the projections (carrying the batched LoRA terms),
the MLP and the head, so numerics follow transformers; Qwen3's per-head q/k norms run where it has them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .runner import Attend, Runner


class LlamaRunner(Runner):
    """``LlamaForCausalLM``-shaped models, batched over the paged KV cache."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, model: nn.Module, max_len: int, kv_cache_memory: int | float | None, max_num_seqs: int) -> None:
        config = model.config
        self.body = model.model
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self._scaling = attn.scaling
        super().__init__(model, max_len, kv_cache_memory, max_num_seqs, len(self.layers), config.num_attention_heads,
                         config.num_key_value_heads, attn.head_dim)

    def scaling(self, layer: int) -> float:
        return self._scaling

    def _forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, position_ids=positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        tokens = ids.shape[0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(tokens, -1, self.head_dim)
            k = attn.k_proj(x).view(tokens, -1, self.head_dim)
            v = attn.v_proj(x).view(tokens, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            hidden = hidden + attn.o_proj(attend(i, q, k, v))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _logits(self, last_hidden: Tensor) -> Tensor:
        return self.model.lm_head(self.body.norm(last_hidden)).float()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
