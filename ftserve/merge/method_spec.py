"""Merge methods for full models, what each one is: its parameters and their checks, and what its fold is given.

A ``ModelMergeMethod`` (methods.py holds them all) declares its parameters (``Param``: per input or shared, with
a default or ``REQUIRED``), how many inputs it merges and whether one of them is the base, and the fold that
computes it (folds.py). ``check`` refuses a bad recipe in one line before anything is read. Per output tensor,
its fold is given a ``TensorInputs``: the tensor's name, shape and dtypes, each input's rows (``InputRows``, read
block by block) and the parameter values of each input and the shared ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from ..errors import ConfigError
from .combine import TensorFold


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    per_input: bool
    default: object = REQUIRED


@dataclass(frozen=True)
class ModelMergeMethod:
    """One of mergekit's methods: its parameters and input contract, and its fold (methods.py has the math).

    ``sparsification`` (mergekit's name: magnitude, random, magnitude_outliers, della_magprune) and ``consensus``
    (the TIES sign election) say which task-vector method it is."""

    name: str
    title: str
    reference: str
    params: tuple[Param, ...]
    needs_base: bool
    fold_class: Callable[[ModelMergeMethod, TensorInputs], TensorFold]  # its fold: a class of folds.py
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    sparsification: str | None = None
    consensus: bool = False

    def check(self, per_input: list[dict[str, object]], shared: dict[str, object],
              base_index: int | None = None) -> None:
        """ConfigError, one line naming the method and the parameter, for an unknown parameter, a missing
        required one, a wrong type or an out-of-range value; values are scalars. ``per_input``: one dict per
        listed input; ``base_index``: which of them is the base, whose per-model values a method that needs a
        base ignores (as mergekit does; ``linear`` has no base and weighs every input)."""
        count = len(per_input) + int(self.needs_base and base_index is None)
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            wanted = (f"exactly {self.min_inputs}" if self.min_inputs == self.max_inputs
                      else f"at least {self.min_inputs}")
            raise ConfigError(f"{self.name} merges {wanted} models counting the base, got {count}")
        self._check_values("parameters", shared, per_input=False)
        for i, values in enumerate(per_input):
            self._check_values(f"input {i}", values, per_input=True)
        weighed = [i for i in range(len(per_input)) if not (self.needs_base and i == base_index)]
        for p in self.params:
            if p.default is REQUIRED and not p.per_input and p.name not in shared:
                raise ConfigError(f"{self.name} needs {p.name!r} in parameters")
            missing = [i for i in weighed if p.default is REQUIRED and p.per_input and p.name not in per_input[i]]
            if missing:
                raise ConfigError(f"{self.name} needs {p.name!r} for input {missing[0]}")
        if self.name == "linear" and self.param_value(shared, "normalize") and \
                sum(per_input[i]["weight"] for i in weighed) == 0:
            # mergekit's task arithmetic guards its divisor, its linear merge does not
            raise ConfigError(f"{self.name}: the weights sum to 0, so normalize divides by zero; set normalize: "
                              f"false or change the weights")
        if self.sparsification == "della_magprune":
            for i in weighed:
                d, e = self.param_value(per_input[i], "density"), self.param_value(per_input[i], "epsilon")
                if d < 1 and not (0 < d - e and d + e < 1):  # mergekit raises this while merging
                    raise ConfigError(f"{self.name}: input {i} has density {d:g} and epsilon "
                                      f"{e:g}; density - epsilon and density + epsilon must both lie in (0, 1)")

    def _check_values(self, scope: str, values: dict[str, object], per_input: bool) -> None:
        kind = "per-model" if per_input else "shared"
        for key, value in values.items():
            p = next((p for p in self.params if p.name == key and p.per_input == per_input), None)
            if p is None:
                known = ", ".join(q.name for q in self.params if q.per_input == per_input)
                raise ConfigError(f"{self.name} has no {kind} parameter {key!r} ({scope}); its {kind} parameters: "
                                  f"{known or 'none'}")
            self._check_value(p, value, scope)

    def param_value(self, values: dict[str, object], name: str) -> Any:
        """``values[name]``, else the parameter's default (None for a parameter this method does not have)."""
        if name in values:
            return values[name]
        return next((p.default for p in self.params if p.name == name), None)

    def _check_value(self, p: Param, value: object, scope: str) -> None:
        where = f"{self.name}: {p.name} ({scope})"
        if p.kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if p.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if p.kind is float and not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        if p.name == "density" and not 0 < value <= 1:
            treated = "no pruning" if value > 1 else "dropping the whole task vector"
            raise ConfigError(f"{where} must lie in (0, 1], got {value!r} (mergekit would silently treat it as "
                              f"{treated})")
        if p.name in ("t", "gamma", "epsilon") and not 0 <= value <= 1:
            raise ConfigError(f"{where} must lie in [0, 1], got {value!r}")

    def fold(self, tensor: TensorInputs) -> TensorFold:
        return self.fold_class(self, tensor)


class InputRows(Protocol):
    """One input model's version of one output tensor, read block by block (from worker threads)."""

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of theta_i as stored (any float dtype; the method casts to math dtype).
        ``base``: the same rows of the base tensor in fp32 (exact copy of the stored values)."""


@dataclass
class TensorRows:
    """An input held whole in memory (tests, verify, small tensors)."""

    tensor: Tensor

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        rows = self.tensor.shape[0] if self.tensor.dim() else 1
        return self.tensor.reshape(rows, -1)[start:stop]


@dataclass
class TensorInputs:
    name: str
    shape: tuple[int, ...]
    stored_dtype: torch.dtype
    math_dtype: torch.dtype
    inputs: list[InputRows]
    base_index: int | None
    params: list[dict[str, object]]
    shared: dict[str, object]
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def cols(self) -> int:
        return self.numel // self.rows if self.rows else 0


def work_dtype(method: ModelMergeMethod, math_dtype: torch.dtype) -> torch.dtype:
    """The dtype a task vector is masked and rescaled in: mergekit's random masks (bernoulli, DELLA) work in
    bf16 for bf16 and in fp32 otherwise (on CPU, where torch has no fp16 bernoulli); magnitude cuts in the math
    dtype."""
    if method.random:
        return math_dtype if math_dtype == torch.bfloat16 else torch.float32
    return math_dtype
