"""Merge parameters as mergekit reads them: one value checked and made canonical, then resolved per tensor.

A parameter value is a scalar, a gradient or a list of filters, resolved per tensor as mergekit resolves it
(``resolve_param``): a gradient ``[v_0, ..., v_m]`` is read at ``t = i / (L - 1)`` for layer ``i`` of ``L``
(``t = 1`` when ``L = 1``; ``t = 0`` for tensors outside the layers: embeddings, final norm, head), linearly
between the two nearest of its ``m + 1`` evenly spaced points (booleans take the point at or below ``t``); a
filter list ``[{filter: self_attn, value: ...}, {value: ...}]`` gives the first entry whose ``filter`` is a
substring of the tensor name (no filter, or ``*``: every tensor). Which setting applies (a model's own, the
shared ``parameters:``, the method's default) is the request's concern (``request.resolve_params``).
"""

from __future__ import annotations

import math
import re

from ..errors import ConfigError
from .methods import ModelMergeMethod, Param

ParamValue = float | bool | list   # scalar; a gradient [v0, v1, ...]; or mergekit's [{"filter": str, "value": ...}]

BOOLEANS = {**dict.fromkeys(("true", "yes", "on", "t", "y", "1", "1.0"), True),
            **dict.fromkeys(("false", "no", "off", "f", "n", "0", "0.0"), False)}
LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def canonical_value(method: ModelMergeMethod, params: dict, name: str, value: object, where: str) -> ParamValue:
    """``value`` checked and made canonical: floats for float parameters (YAML's ``1e-3`` is a string: mergekit
    reads it as a number, so do we), a filter list always a list of {filter?, value} mappings."""
    if name not in params:
        raise ConfigError(f"{where} is not a {method.name} parameter (mergekit would ignore it); it takes "
                          f"{', '.join(params) or 'none'}")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out = []
        for entry in value:
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry or not isinstance(entry.get("filter", ""), (str, type(None))):
                raise ConfigError(f"{where}: each filter entry is {{filter: NAME, value: V}} or {{value: V}}; got "
                                  f"{entry}")
            inner = entry["value"]
            if isinstance(inner, (dict, list)) and not _is_gradient(inner):
                raise ConfigError(f"{where}: a filter's value is a number or a gradient [v0, v1, ...]; got {inner}")
            given = {"filter": entry["filter"]} if entry.get("filter") is not None else {}
            out.append({**given, "value": _scalars(params[name], inner, where)})
        return out
    if isinstance(value, list) and not _is_gradient(value):
        raise ConfigError(f"{where}: a list is a gradient of numbers [v0, v1, ...] or a list of filters "
                          f"[{{filter: self_attn, value: ...}}, {{value: ...}}]; got {value}")
    return _scalars(params[name], value, where)


def _is_gradient(value: object) -> bool:
    return isinstance(value, list) and bool(value) and not any(isinstance(e, (dict, list)) for e in value)


def _scalars(param: Param, value: object, where: str) -> ParamValue:
    if isinstance(value, list):
        return [_scalar(param, v, where) for v in value]
    return _scalar(param, value, where)


def _scalar(param: Param, value: object, where: str) -> float | bool:
    """One value as mergekit's (pydantic's) lax reading takes it: for a boolean, 0/1 and yes/no/on/off too."""
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        spelled = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
        if spelled not in BOOLEANS:
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return BOOLEANS[spelled]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    value = float(value)
    if param.name == "density" and not 0 < value <= 1:
        raise ConfigError(f"{where}: {value} is outside (0, 1]; mergekit would silently "
                          + ("treat it as no pruning" if value > 1 else "drop the whole task vector")
                          + "; give a fraction of the delta to keep, e.g. 0.5")
    return value


def resolve_param(value: ParamValue, tensor_name: str, num_layers: int) -> object:
    """``value`` for ``tensor_name`` in a model of ``num_layers`` layers, as mergekit resolves it (module
    docstring); None when no filter matches (the next setting, or the method's default, applies)."""
    index = layer_index(tensor_name)
    if index is None:
        t = 0.0
    else:
        t = index / (num_layers - 1) if num_layers > 1 else 1.0
    return _evaluate(value, tensor_name, t)


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3, ``transformer.h.0.attn...``
    -> 0): the first all-digit part of its dotted name; None for tensors outside the layers."""
    found = LAYER.search(tensor_name)
    return int(found.group(1)) if found else None


def _evaluate(value: ParamValue, tensor_name: str, t: float) -> object:
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], dict):
        for entry in value:
            if entry.get("filter") in (None, "*") or entry["filter"] in tensor_name:
                return _evaluate(entry["value"], tensor_name, t)
        return None
    if any(isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * value[low] + frac * value[high]
