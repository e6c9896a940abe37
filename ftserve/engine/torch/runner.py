"""The forward pass of a decoder-only model over a paged KV cache: decode and prefill together.

Each architecture (llama_runner.py, gpt2_runner.py) runs its own modules for everything but attention
(embeddings, norms, positions, projections, which carry the batched LoRA terms, MLP, head), so numerics
follow transformers; this module holds what they share. The KV cache is a pool of blocks of BLOCK_SIZE
positions (kv_blocks.py keeps the books), one tensor per layer for K and one for V, head-major so that each
head's positions of a block run contiguously::

    K, V per layer: (kv_heads, blocks * BLOCK_SIZE, head_dim)    position p of a sequence at slot
                                           blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE

The pool's size is one setting (``kv_cache_memory``: bytes, or a fraction of the memory free once the model
is loaded; by default what ``max_num_seqs`` requests of ``max_model_len`` tokens could need, at most half the
memory free), allocated when the engine starts. A cache too large for the memory free, or too small for one
request of ``max_model_len`` tokens, is refused at start, naming the setting.

One step is one forward over a list of pieces, each ``tokens`` of one sequence at positions ``start ..``: a
decode piece is one token; a prefill piece is a whole prompt or one chunk of a long one (chunked prefill).
All tokens of the step are flattened into one ``(T, hidden)`` activation, so every projection is one GEMM for
decodes and prefills alike (as in vLLM), and a request arriving while others decode costs no extra forward.
Each layer writes every token's K/V to its slot, then attends in groups of consecutive pieces
(paged_attention.py): decodes in home rows through one strided view of the cache, prompts with nothing
cached among themselves, and everything else through its block table.

Only the tokens whose logits a piece asks for (its last, to sample; all, for prompt log probabilities) go
through the output head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ...errors import ServingError
from .kv_blocks import BLOCK_SIZE, blocks_for
from .paged_attention import attention_groups

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's MemAvailable; None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def cache_blocks(memory: int | float | None, block_bytes: int, row_blocks: int, max_num_seqs: int,
                 device: torch.device) -> int:
    """Blocks of ``block_bytes`` in a cache of ``memory`` (bytes, or a fraction of the memory free; None: enough
    for ``max_num_seqs`` rows of ``row_blocks``, at most half the memory free), checked against the memory free
    and against one request of ``row_blocks`` blocks."""
    free = available_memory(device)
    token_kib = f"each token of one request takes {block_bytes / BLOCK_SIZE / 2 ** 10:.0f} KiB"
    if memory is None:
        size = max_num_seqs * row_blocks * block_bytes
        if free is not None:
            size = max(min(size, free // 2), row_blocks * block_bytes)
    elif isinstance(memory, float):
        if free is None:
            raise ServingError(f"cannot tell the memory free on {device}: give kv_cache_memory in bytes")
        size = int(free * memory)
    else:
        size = memory
    if free is not None and size > free:
        raise ServingError(f"the KV cache (kv_cache_memory) takes {size / 2 ** 30:.2f} GiB, and "
                           f"{free / 2 ** 30:.2f} GiB of memory is free; lower it ({token_kib})")
    if size // block_bytes < row_blocks:
        raise ServingError(f"the KV cache (kv_cache_memory, {size / 2 ** 20:.1f} MiB) holds "
                           f"{size // block_bytes * BLOCK_SIZE} tokens, fewer than one request of "
                           f"max_model_len {row_blocks * BLOCK_SIZE} needs; raise it or lower max_model_len "
                           f"({token_kib})")
    return size // block_bytes


class Runner:
    """The step over a paged KV cache, shared by all architectures; a subclass runs one architecture's layers
    (``_forward``) and head (``_logits``)."""

    def __init__(self, model: nn.Module, max_len: int, kv_cache_memory: int | float | None, max_num_seqs: int,
                 n_layers: int, n_heads: int, n_kv: int, head_dim: int) -> None:
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.max_len = max_len
        weight = model.get_output_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.row_blocks = blocks_for(max_len)
        block_bytes = 2 * n_layers * n_kv * head_dim * self.dtype.itemsize * BLOCK_SIZE
        self.num_blocks = cache_blocks(kv_cache_memory, block_bytes, self.row_blocks, max_num_seqs, self.device)
        self.rows = self.num_blocks // self.row_blocks
        shape = (n_kv, self.num_blocks * BLOCK_SIZE, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]

    def wipe(self, blocks: list[int]) -> None:
        """Zero the K/V of ``blocks``."""
        slots = (torch.tensor(blocks, device=self.device)[:, None] * BLOCK_SIZE
                 + torch.arange(BLOCK_SIZE, device=self.device)).reshape(-1)
        for cache in self.k + self.v:
            cache.index_fill_(1, slots, 0)

    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def scaling(self, layer: int) -> float:
        """The factor on q.k in ``layer``'s attention."""
        raise NotImplementedError

    def _forward(self, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """Hidden states ``(T, hidden)`` of flattened tokens; ``attend(layer, q, k, v)`` with q ``(T, heads, d)``
        and k, v ``(T, kv_heads, d)`` (after any rotary embedding) returns ``(T, heads * d)``."""
        raise NotImplementedError

    def _logits(self, hidden: Tensor) -> Tensor:
        """Float logits ``(k, vocab)`` of final hidden states ``(k, hidden)``."""
        raise NotImplementedError

    def forward(self, pieces: list[Piece]) -> Tensor:
        """One step over ``pieces``; next-token logits ``(k, vocab)``, piece by piece in order: none, the last
        token's, or every token's, as each piece asks."""
        device = self.device
        ids = [t for p in pieces for t in p.tokens]
        positions = [p.start + j for p in pieces for j in range(len(p.tokens))]
        slots = [p.blocks[q // BLOCK_SIZE] * BLOCK_SIZE + q % BLOCK_SIZE
                 for p in pieces for q in range(p.start, p.start + len(p.tokens))]
        where = torch.tensor(slots, dtype=torch.long, device=device)
        groups = attention_groups(pieces, self)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.k[i].index_copy_(1, where, k.transpose(0, 1))
            self.v[i].index_copy_(1, where, v.transpose(0, 1))
            outs = [g.attend(i, q, k, v) for g in groups]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        hidden = self._forward(torch.tensor(ids, dtype=torch.long, device=device),
                               torch.tensor(positions, dtype=torch.long, device=device), attend)
        picked, offset = [], 0
        for p in pieces:
            offset += len(p.tokens)
            picked += range(offset - p.logit_rows, offset)
        if len(picked) < len(ids):
            hidden = hidden.index_select(0, torch.tensor(picked, dtype=torch.long, device=device))
        return self._logits(hidden)


@dataclass
class Piece:
    """Tokens of one sequence at positions ``start ..``, its block table ``blocks`` (covering them) and its
    ``home`` row when every block is its home row's (kv_blocks.py); ``logits``: which tokens' next-token logits
    to return: "last" (to sample), "all" (prompt log probabilities too) or "none" (a chunk mid-prompt)."""

    start: int
    tokens: list[int]
    blocks: list[int]
    home: int | None = None
    logits: Literal["none", "last", "all"] = "last"

    @property
    def logit_rows(self) -> int:
        """Rows of logits this piece yields: none, its last token's, or all of its tokens'."""
        return {"none": 0, "last": 1}.get(self.logits, len(self.tokens))
