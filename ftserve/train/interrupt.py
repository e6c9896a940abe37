"""Ctrl-C during ``ftserve train``: stop within moments and keep the last completed step as a checkpoint that
``--resume`` continues from.

Python runs a signal handler only between two bytecodes of the main thread, and a step's backward pass is one
call into torch's autograd engine: Python's own Ctrl-C (KeyboardInterrupt) waits for the whole backward, which is
most of a step, tens of seconds on a CPU. So the handler here only records the request, and the step in flight is
abandoned at the next point where Python runs: a forward pre-hook of every module, a gradient hook of every trained
tensor (on CPU the autograd engine calls it on the main thread, where the pending handler runs first), and the
callbacks at the start of a step and before the optimizer's. Until the optimizer steps, the model and the optimizer
still hold the last completed step; a request that arrives during the optimizer's step lets that step finish.

What is kept is the trainer's own checkpoint (adapter, optimizer, scheduler, RNG, trainer state), written with the
RNG and the token count as they stood at the end of that step, so a resumed run is the run that never stopped.
A second Ctrl-C stops at once and keeps nothing more.
"""

from __future__ import annotations

import contextlib
import random
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import TrainerCallback

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequested(Exception):
    """Raised inside the step in flight once Ctrl-C (or SIGTERM) asked training to stop."""


class StopAtTheLastStep(TrainerCallback):
    """Turns the first Ctrl-C into a stop at the last completed step, the second into a stop at once."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.requested = False
        self.hooks: list[Any] = []
        self.last_step: tuple[dict, int] | None = None  # (RNG states, tokens seen) at the end of the last step

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        previous = {number: signal.signal(number, self._on_signal) for number in SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            for hook in self.hooks:
                hook.remove()
            self.hooks.clear()

    def _on_signal(self, number: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo(f"{SIGNALS[number]}: stopping, keeping the last completed step as a checkpoint "
                  f"(Ctrl-C again stops at once and keeps nothing more)")

    def _check(self, *args: Any) -> None:
        if self.requested:
            raise StopRequested

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hooks += [module.register_forward_pre_hook(self._check) for module in model.modules()]
        self.hooks += [p.register_hook(self._check) for p in model.parameters() if p.requires_grad]

    def on_step_begin(self, args, state, control, **kwargs):
        self._check()
        self.last_step = (_rng_states(), state.num_input_tokens_seen)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._check()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:  # it came during the optimizer's step, which has completed this one
            self.last_step = (_rng_states(), state.num_input_tokens_seen)
            raise StopRequested

    def keep_last_step(self, trainer) -> None:
        """Write the trainer's checkpoint of its last completed step, unless it has one already or none ran."""
        step = trainer.state.global_step
        folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        if self.last_step is None or step == 0 or (folder / "trainer_state.json").is_file():
            return
        states, trainer.state.num_input_tokens_seen = self.last_step
        _set_rng_states(states)
        trainer._save_checkpoint(trainer.model, trial=None)  # the writer of every checkpoint of the run


def _rng_states() -> dict:
    """What the trainer saves of the random generators, so a resumed run draws what this one would have."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.random.set_rng_state_all(states["cuda"])
