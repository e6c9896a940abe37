"""The forward passes of a Llama-family model over a preallocated, per-row KV cache.

The model's own modules compute everything but attention (embeddings, RMSNorms, RoPE, projections, which
carry the batched LoRA terms, MLP, head), so numerics follow transformers. Attention reads a cache written
in place::

    K, V per layer: (max_batch, kv_heads, max_len, head_dim)

Row ``i`` of the running batch lives in cache row ``i`` and holds its tokens in columns ``0 .. len_i - 1``.

* prefill: new prompts, right-padded to one length ``L``, run causally from an empty cache and are written
  to rows ``n .. n + B - 1``; padding columns hold junk that no row ever attends to, and decoding
  overwrites them. Only the last prompt position of each row goes through the output head.
* decode: one token per running row at position ``len_i``; its K/V go to column ``len_i`` of its row;
  attention spans columns ``0 .. max(len) `` with a per-row mask ``column <= len_i``.
* a finished row is replaced by the last running row (one row copied), so rows stay ``0 .. n - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ServingError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ServingError(f"the embedded engine runs Llama-family models ({', '.join(SUPPORTED)}); this base is "
                           f"{model_type!r}. Serve it with the vLLM engine, or merge the adapter and use "
                           f"transformers")


class LlamaRunner:
    """Prefill and decode for ``LlamaForCausalLM``-shaped models, batched over rows of a KV cache."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int) -> None:
        check_supported(model)
        config = model.config
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.scaling = attn.scaling
        self.max_batch, self.max_len = max_batch, max_len
        weight = model.lm_head.weight
        shape = (max_batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.device = weight.device

    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def prefill(self, first_row: int, prompts: list[list[int]]) -> Tensor:
        """Run new prompts into rows ``first_row ..``; the next-token logits of each prompt, (B, vocab)."""
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0).expand(len(prompts), -1)
        rows = slice(first_row, first_row + len(prompts))

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.k[i][rows, :, :length] = k
            self.v[i][rows, :, :length] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)

        hidden = self._forward(ids, positions, attend)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._logits(hidden[torch.arange(len(prompts), device=self.device), last])

    def decode(self, tokens: list[int], lengths: list[int]) -> Tensor:
        """One step for rows ``0 .. n - 1``: token ``tokens[i]`` at position ``lengths[i]``; logits (n, vocab)."""
        n = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        span = max(lengths) + 1
        mask = (torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(n, 1, 1, span)
        # (row, head, pos) as a row index of the cache viewed as (max_batch * kv_heads * max_len, head_dim):
        # index_copy_ is far cheaper than advanced-index assignment on CPU.
        heads = torch.arange(self.n_kv, device=self.device)
        where = ((torch.arange(n, device=self.device)[:, None] * self.n_kv + heads) * self.max_len
                 + pos[:, None]).reshape(-1)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.k[i].view(-1, self.head_dim).index_copy_(0, where, k[:, :, 0].reshape(-1, self.head_dim))
            self.v[i].view(-1, self.head_dim).index_copy_(0, where, v[:, :, 0].reshape(-1, self.head_dim))
            return F.scaled_dot_product_attention(q, self.k[i][:n, :, :span], self.v[i][:n, :, :span],
                                                  attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)

        hidden = self._forward(ids, pos.unsqueeze(1), attend)
        return self._logits(hidden[:, -1])

    def move_row(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def _forward(self, ids: Tensor, positions: Tensor, attend) -> Tensor:
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        batch, length = ids.shape
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, length, -1, self.head_dim)
            k = attn.k_proj(x).view(batch, length, -1, self.head_dim)
            v = attn.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = attend(i, q, k, v).transpose(1, 2).reshape(batch, length, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _logits(self, last_hidden: Tensor) -> Tensor:
        return self.model.lm_head(self.body.norm(last_hidden)).float()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
