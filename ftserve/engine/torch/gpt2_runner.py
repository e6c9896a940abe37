"""GPT-2 on the shared step and KV cache of runner.py.

Learned absolute position embeddings, LayerNorms before attention and MLP, one fused ``c_attn`` projection
(a Conv1D: an adapter on it adapts q, k and v at once, as PEFT does) split into q, k, v, and the head tied
to the token embeddings. The model's own modules run, so numerics follow transformers.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import ServingError
from .runner import Attend, Runner


class Gpt2Runner(Runner):
    """``GPT2LMHeadModel``, batched over the paged KV cache."""

    model_types = ("gpt2",)

    def __init__(self, model: nn.Module, max_len: int, kv_cache_memory: int | float | None, max_num_seqs: int) -> None:
        config = model.config
        if getattr(config, "reorder_and_upcast_attn", False):
            raise ServingError("this GPT-2 sets reorder_and_upcast_attn, which the embedded engine does not "
                               "reproduce; merge the adapter and use transformers")
        self.body = model.transformer
        self.layers = list(self.body.h)
        self.width = config.n_embd
        heads = config.n_head
        self.scale_by_width = config.scale_attn_weights
        self.scale_by_layer = config.scale_attn_by_inverse_layer_idx
        super().__init__(model, max_len, kv_cache_memory, max_num_seqs, len(self.layers), heads, heads,
                         self.width // heads)

    def scaling(self, layer: int) -> float:
        scale = self.head_dim ** -0.5 if self.scale_by_width else 1.0
        return scale / (layer + 1) if self.scale_by_layer else scale

    def _forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        hidden = self.body.wte(ids) + self.body.wpe(positions)
        tokens = ids.shape[0]
        for i, block in enumerate(self.layers):
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(self.width, dim=-1)
            shape = (tokens, self.n_heads, self.head_dim)
            out = attend(i, q.reshape(shape), k.reshape(shape), v.reshape(shape))
            hidden = hidden + block.attn.c_proj(out)
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(self.body.ln_f(hidden)).float()
