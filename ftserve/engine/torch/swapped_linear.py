"""The base projections of the embedded engine on CPU in fp32, as ``(W @ x.T).T`` instead of ``x @ W.T``.

On this project's CPU (2 threads, the PyTorch wheel's MKL), ``F.linear(x, W)`` on a ``(T, in)`` activation
takes over twice as long as the same product computed as ``torch.mm(W, x.T).T`` when ``T`` is a decode batch
(T = 32 on the 100M benchmark model: 8 layers' projections 177 ms vs 73 ms, the 32000-row head 77 ms vs
35 ms, best of 5), and the two agree bit for bit for T = 1 and T >= 12 over every weight shape tried (64 ..
32000 rows, 64 .. 2048 columns, with and without bias, T up to 2048), while for 2 <= T <= 11 they differ in
the last bits. So the swapped form runs only where it was found identical, and greedy outputs do not move.
For a long prefill (T = 512) the two take about the same time (1092 vs 1125 ms). bf16 (where the two were
also identical, not yet timed) and other devices keep ``F.linear``.

``install`` replaces ``forward`` on each exact ``nn.Linear`` instance of the model (a subclass such as
bitsandbytes' ``Linear4bit`` keeps its own), so the base layers that ``lora_slots.BatchedLoraLinear`` calls go
this way too.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_ROWS = range(2, 12)  # row counts where the swapped product differs from F.linear in the last bits


def swapped_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if x.dim() != 2 or x.shape[0] in SMALL_ROWS:
        return F.linear(x, self.weight, self.bias)
    if self.bias is None:
        return torch.mm(self.weight, x.T).T
    return torch.addmm(self.bias[:, None], self.weight, x.T).T


def install(model: nn.Module) -> int:
    """Route every exact ``nn.Linear`` of ``model`` held in fp32 on CPU through ``swapped_forward``; how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(swapped_forward, module)
            count += 1
    return count
