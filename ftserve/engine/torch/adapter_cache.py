"""Which adapters the engine knows, which it holds in memory, and which sit in compute slots.

Three tiers, with vLLM's names and meanings:

* registered: every loaded name and its folder (a few bytes each; the front end's AdapterRegistry);
* cached: exported factors in memory, at most ``max_cpu_loras`` adapters, least recently used evicted first;
  an evicted adapter is read again from its folder when a request asks for it;
* active: at most ``max_loras`` adapters written into the stacked slots that a forward pass reads.

A request pins its adapter from submission to its last chunk; a pinned adapter is never evicted from the
cache, and a slot is reused only when no running row reads it. So what a request needs is there until it
ends, and each tier stays within its bound. Slots are touched by the engine thread only; the cache by both
threads, under ``lock``.

An adapter loaded under a root (the server's ``--adapter-root``) keeps that root on its record, and every read
of its folder, the first and each one after an eviction, checks first that nothing in the folder resolves
outside it (ftserve/confinement.py, which says the check's limits). Adapters loaded without a root are trusted.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...methods import LoraFactors
from ..adapter_files import read_checked
from ..errors import AdapterLoadError
from ..frontend import RegisteredAdapter
from .lora_slots import LoraSlots, SlotFactors
from .openmp import release_pool

_LOADS = itertools.count(1)  # kv_key 0 is the base model's


@dataclass(eq=False)
class AdapterRecord(RegisteredAdapter):
    """A registered adapter (frontend.py) and where this engine holds it: factors in memory, a slot; ``kv_key``
    names this load in the prefix cache (kv_blocks.py): a name loaded again, maybe with other weights, gets
    another key, so no block computed under the old weights is ever reused for it."""

    factors: SlotFactors | None = None
    slot: int | None = None
    last_used: float = field(default_factory=time.monotonic)
    kv_key: int = field(default_factory=lambda: next(_LOADS))


def read_factors(path: Path, slots: LoraSlots, max_rank: int, root: Path | None = None) -> tuple[Any, SlotFactors]:
    """``read_checked`` (../adapter_files.py) for ``slots``' modules and dtype, the factors as the slots take
    them, with a row-scaled adapter's row scales computed here, once per read, from the served base weights.
    Run off the engine thread, it gives back the OpenMP pool its torch work made on this thread (openmp.py)."""
    try:
        folder, exported = read_checked(path, slots.shapes(), max_rank, root, slots.dtype)
        row_scales = {name: _row_scale(path, name, f, slots) for name, f in exported.items() if f.row_scaled}
        return folder, SlotFactors({name: (f.A.detach().float().contiguous(), f.B.detach().float().contiguous(),
                                           float(f.scale)) for name, f in exported.items()}, row_scales)
    finally:
        release_pool()


@torch.no_grad()
def _row_scale(path: Path, name: str, factors: LoraFactors, slots: LoraSlots) -> torch.Tensor:
    """``r = m / ||W + s B A||_row`` of module ``name`` from its served weight, checked finite in the serving dtype
    (a zero row of the adapted weight makes it infinite)."""
    try:
        r = factors.row_scale(slots.base_weight(name))
    except ValueError as exc:
        raise AdapterLoadError(f"{path}: {name}: a row-scaled adapter needs the base weight ({exc}); serve it on "
                               f"an unquantized base model") from None
    if not bool(torch.isfinite(r.to(slots.dtype)).all()):
        raise AdapterLoadError(f"{path}: {name}: its row scale m / ||W + s B A|| is not finite in "
                               f"{str(slots.dtype).removeprefix('torch.')} (a row of the adapted weight is zero or "
                               f"nearly so); the adapter is corrupt or not for this base model")
    return r.float()


class AdapterCache:
    def __init__(self, slots: LoraSlots, max_loras: int, max_cpu_loras: int) -> None:
        self.slots = slots
        self.max_loras, self.max_cpu_loras = max_loras, max_cpu_loras
        self.lock = threading.Lock()
        self.cached: OrderedDict[str, AdapterRecord] = OrderedDict()  # least recently used first
        self.slot_owner: list[AdapterRecord | None] = [None] * max_loras
        self.slot_rows = [0] * max_loras  # running rows reading each slot (engine thread)
        self.slot_used = [0.0] * max_loras

    # CPU tier (either thread) ----------------------------------------------------------------------

    def put(self, record: AdapterRecord, factors: SlotFactors | None) -> bool:
        """Make ``record``'s factors resident, evicting unpinned adapters; False when every cached one is pinned
        (or no factors were given for an adapter not resident)."""
        with self.lock:
            if record.factors is not None:
                self.cached.move_to_end(record.info.name)
                return True
            if factors is None:
                return False
            while len(self.cached) >= self.max_cpu_loras:
                victim = next((r for r in self.cached.values() if r.pins == 0), None)
                if victim is None:
                    return False
                self.cached.pop(victim.info.name)
                victim.factors = None
            record.factors = factors
            self.cached[record.info.name] = record
            return True

    def drop(self, record: AdapterRecord) -> None:
        with self.lock:
            self.cached.pop(record.info.name, None)
            record.factors = None

    # Slots (engine thread) ------------------------------------------------------------------------------

    def acquire_slot(self, record: AdapterRecord) -> int | None:
        """The slot holding ``record``, writing it into a free or idle one if needed; None if all are busy.
        The caller adds a running row to the slot (``slot_rows``) before acquiring for anyone else."""
        with self.lock:
            if record.slot is None:
                idle = [s for s in range(self.max_loras) if self.slot_rows[s] == 0]
                if not idle or record.factors is None:
                    return None
                slot = min(idle, key=lambda s: (self.slot_owner[s] is not None, self.slot_used[s], s))
                previous = self.slot_owner[slot]
                if previous is not None:
                    previous.slot = None
                self.slots.write(slot, record.factors)
                self.slot_owner[slot], record.slot = record, slot
            self.slot_used[record.slot] = time.monotonic()
            return record.slot

    def release_slot(self, record: AdapterRecord) -> None:
        """Forget an unloaded adapter's slot (no row reads it any more)."""
        with self.lock:
            if record.slot is not None and self.slot_owner[record.slot] is record:
                self.slot_owner[record.slot] = None
                self.slots.clear(record.slot)
            record.slot = None

    def active(self) -> int:
        return sum(owner is not None for owner in self.slot_owner)
