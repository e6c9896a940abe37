"""Merge, inputs: full models, adapters and model+adapter pairs, planned as the rows a merge method combines.

A mergekit-style merge (``MergeRequest``, request.py) names its inputs as model folders (or hub ids in the local
cache), ``model+adapter`` pairs (mergekit's ``model+lora``) or bare adapter folders (the request's base plus that
adapter). Per output tensor, each input becomes an ``InputRows`` (methods.py): rows ``[start, stop)`` of that
input's version ``theta_i`` of the tensor, as stored::

    the base itself          theta = W_base                          BaseRows (the rows write.py already read)
    another model folder     theta = W_model                         ModelRows (pread from its own checkpoint)
    model + adapter          theta = round(W + (B @ A) * s)          AdapterRows over the model's rows

For an adapter, ``B @ A`` and ``* s`` are computed in fp32 (transposed for GPT-2's Conv1D), added to the stored
``W`` in fp32 and rounded once to ``W``'s dtype: what mergekit's ``model+lora`` gives (PEFT's ``merge_and_unload``
with its fp32 adapter weights adds an fp32 delta in place). A tensor the adapter does not target is ``W``.

Everything is checked before a byte is written: every model resolves and has the base's architecture, tensor
names and shapes; every adapter fits its model and is finite (plan.py's checks); every parameter, resolved per
tensor (gradients and filters, request.py), passes the method's ``check``. Memory stays bounded by a few blocks
per input whatever the model size: nothing here holds a tensor, only factors and file offsets.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..files.adapter_folder import AdapterFolder, read_adapter
from ..files.checkpoint import FLOATS, Checkpoint, TensorEntry, TensorReader, open_checkpoint, parse_size, resolve_base
from .combine import Part
from .methods import REQUIRED, InputRows, ModelMergeMethod, TensorInputs, get_merge_method
from .plan import DTYPES, AdapterSpec, MergePlan, OutputTensor, main_dtype, plan_parts, shard_tensors
from .request import MergeRequest, layer_index, resolve_param

IDENTITY_KEYS = ("architectures", "model_type")  # config.json keys that must agree across merged models


@dataclass
class Source:
    """One input of the request, resolved: the model folder its weights come from and the adapter on top
    (``parts``: output key -> the adapter's fp32 factors there; ``transposed``: stored as Conv1D)."""

    text: str
    path: Path
    checkpoint: Checkpoint
    adapter: AdapterFolder | None = None
    parts: dict[str, Part] | None = None
    transposed: dict[str, bool] | None = None
    reader: TensorReader | None = None  # another model's checkpoint, opened by write.py
    buffers: threading.local = field(default_factory=threading.local)  # its read buffer, one per thread


class BaseRows:
    """theta = the base itself: the rows write.py read, back in the stored dtype (exact), as a copy that a fold
    may change in place without changing the base."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        return base.to(self.dtype, copy=True)


class ModelRows:
    """theta = another checkpoint's stored rows, read by file offset (pread: safe from several threads). Each
    thread reads an input into one buffer of its own, shared by all tensors (``buffers``), so memory stays a
    block per input and thread: the rows returned are valid until this thread reads that input again. A fold
    with first passes reads every block again, so the bytes stay in the page cache until write.py says the
    last pass has begun (``keep_cache = False``)."""

    def __init__(self, reader: TensorReader, entry: TensorEntry, buffers: threading.local) -> None:
        self.reader, self.entry, self.buffers, self.keep_cache = reader, entry, buffers, False

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        size = (stop - start) * self.entry.cols * self.entry.dtype.itemsize
        buffer = getattr(self.buffers, "raw", None)
        if buffer is None or len(buffer) < size:
            buffer = self.buffers.raw = bytearray(size)
        return self.reader.read_rows(self.entry, start, stop, buffer, keep_cache=self.keep_cache)


class AdapterRows:
    """theta = round(W + (B @ A) * s) with W the rows of ``model`` (None: the base), as the module docstring."""

    def __init__(self, part: Part, transposed: bool, dtype: torch.dtype, model: InputRows | None) -> None:
        self.factors, self.transposed, self.dtype, self.model = part.factors, transposed, dtype, model

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        weight = base if self.model is None else self.model.rows(base, start, stop)
        f = self.factors
        if self.transposed:
            delta = torch.mm(f.B, f.A[:, start:stop]).t()
        else:
            delta = torch.mm(f.B[start:stop], f.A)
        return delta.mul_(f.scale).add_(weight).to(self.dtype)


def plan_models(request: MergeRequest, max_shard_size: str | int = "5GB", allow_pickle: bool = False) -> MergePlan:
    """Resolve and check every input of ``request``, resolve and check every parameter on every tensor, and lay
    out the output (a ``MergePlan`` with ``request``, and the other models' ``readers`` for write.py). Raises
    ConfigError, CheckpointError or AdapterFileError (one line, naming the input) before anything is read
    beyond headers, configs and adapters."""
    method = get_merge_method(request.method)
    limit = parse_size(max_shard_size)
    math_dtype, out_dtype = (_dtype(request, key) for key in ("dtype", "out_dtype"))
    out_dtype = out_dtype or math_dtype
    if not request.inputs:
        raise ConfigError(f"{method.name}: give at least one model to merge")
    if method.needs_base and request.base is None:
        raise ConfigError(f"{method.name} needs a base model (base_model in the recipe, BASE on the command line)")
    base_name = request.base if request.base is not None else request.inputs[0].model
    if base_name is None:
        raise ConfigError(f"{request.inputs[0].text}: a bare adapter needs a base model to apply it to; give one")
    base = _source(request.inputs[0].text if request.base is None else "base_model", base_name, allow_pickle)
    config = base.checkpoint.config()
    sources = [_input_source(i, base, config, allow_pickle) for i in request.inputs]
    tensors = _output_tensors(method, request, base, sources, math_dtype, out_dtype)
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        config = {**config, "dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})}
    dtype_name = str(config.get("dtype") or config.get("torch_dtype") or main_dtype(tensors))
    readers = list({id(s.reader): s.reader for s in sources if s.reader is not None}.values())
    inputs = [base.path] + [p for s in sources for p in (s.path, s.adapter and s.adapter.path) if p]
    return MergePlan(str(base_name), base.checkpoint, [], tensors, shard_tensors(tensors, limit), config, dtype_name,
                     request=request, inputs=list(dict.fromkeys(inputs)), readers=readers)


def _dtype(request: MergeRequest, key: str) -> torch.dtype | None:
    name = getattr(request, key)
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"{key}: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _source(text: str, model: str, allow_pickle: bool) -> Source:
    try:
        path = resolve_base(model)
        return Source(text, path, open_checkpoint(path, allow_pickle))
    except CheckpointError as exc:
        raise CheckpointError(f"{text}: {exc}" if text != model else str(exc)) from None


def _input_source(spec, base: Source, base_config: dict, allow_pickle: bool) -> Source:
    """One ``InputModel`` resolved and checked against the base: its model (the base itself when it names
    the same folder) and its adapter."""
    if spec.model is None:
        source = Source(spec.text, base.path, base.checkpoint)
    else:
        source = _source(spec.text, spec.model, allow_pickle)
        if source.path.resolve() == base.path.resolve():
            source.checkpoint = base.checkpoint
        else:
            _check_same_model(source, base, base_config)
            source.reader = TensorReader(source.checkpoint)
    if spec.adapter is not None:
        source.adapter = read_adapter(spec.adapter, allow_pickle=allow_pickle)
        method = source.adapter.config.adapter_method
        if method.row_scaled:
            raise ConfigError(f"{spec.text}: a {method.title} adapter rescales each row of its adapted weight, so "
                              f"it has no task vector of its own to merge with a model method; merge it into its "
                              f"base first (ftserve merge BASE ADAPTER), then merge that model")
        tied = bool(source.checkpoint.config().get("tie_word_embeddings", False))
        parts, source.transposed, extra, _ = plan_parts(source.checkpoint, [(AdapterSpec(source.adapter.path),
                                                                              source.adapter)], tied, None)
        if extra:
            raise ConfigError(f"{spec.text}: the adapter targets {next(iter(extra))}, an output embedding tied to "
                              f"the input embedding and not stored; merge it alone (ftserve merge BASE ADAPTER)")
        source.parts = {key: key_parts[0] for key, key_parts in parts.items()}
    return source


def _check_same_model(source: Source, base: Source, base_config: dict) -> None:
    """Same architecture (config.json's ``architectures`` and ``model_type``), same tensor names and shapes."""
    config = source.checkpoint.config()
    for key in IDENTITY_KEYS:
        if config.get(key) != base_config.get(key):
            raise CheckpointError(f"{source.text}: {key} is {config.get(key)!r}, the base's is "
                                  f"{base_config.get(key)!r}; only models of one architecture merge")
    ours, theirs = base.checkpoint.tensors, source.checkpoint.tensors
    missing, extra = [n for n in ours if n not in theirs], [n for n in theirs if n not in ours]
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the base lacks"
        raise CheckpointError(f"{source.text}: {which} ({len(missing)} missing, {len(extra)} extra tensor(s)); "
                              f"not a fine-tune of the base {base.path}")
    for name, entry in ours.items():
        if theirs[name].shape != entry.shape:
            raise CheckpointError(f"{source.text}: {name} has shape {list(theirs[name].shape)}, the base's has "
                                  f"{list(entry.shape)}; not a fine-tune of the base {base.path}")
        if entry.dtype in FLOATS and theirs[name].dtype not in FLOATS:
            raise CheckpointError(f"{source.text}: {name} is stored as {theirs[name].dtype}; merging quantized or "
                                  f"integer weights is not supported")


def _output_tensors(method: ModelMergeMethod, request: MergeRequest, base: Source, sources: list[Source],
                    math_dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> list[OutputTensor]:
    """Every stored tensor of the base: a float one merged by ``method`` with its parameters resolved and
    checked for that tensor, any other copied."""
    entries = base.checkpoint.tensors
    layers = [i for i in map(layer_index, entries) if i is not None]
    num_layers = max(layers) + 1 if layers else 1
    base_index = request.base_index  # mergekit's rule: the input spelled as base_model is the base
    tensors, checked = [], set()
    for key, entry in entries.items():
        if entry.dtype not in FLOATS:
            tensors.append(OutputTensor(key, entry, entry.dtype))
            continue
        per_input, shared = _resolved_params(method, request, key, num_layers)
        signature = repr((per_input, shared))
        if signature not in checked:
            try:
                method.check(per_input, shared, base_index=base_index)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (on tensor {key})" if len(checked) else str(exc)) from None
            checked.add(signature)
        per_input, shared = _with_defaults(method, per_input, shared)
        rows = [_rows(s, key, entry) for s in sources]
        inputs = TensorInputs(key, entry.shape, entry.dtype, math_dtype or entry.dtype, rows, base_index, per_input,
                              shared, request.seed)
        fold = method.fold(inputs)
        keep_in_cache(inputs, fold.passes > 0)
        tensors.append(OutputTensor(key, entry, out_dtype or entry.dtype, fold, inputs))
    return tensors


def _rows(source: Source, key: str, entry: TensorEntry) -> InputRows:
    """The input's rows of tensor ``key``: the base's own rows where it is the base's folder (not read twice)."""
    model = None if source.reader is None else ModelRows(source.reader, source.checkpoint.tensors[key],
                                                         source.buffers)
    part = (source.parts or {}).get(key)
    if part is not None:
        return AdapterRows(part, source.transposed[key], entry.dtype if model is None else model.entry.dtype, model)
    return model or BaseRows(entry.dtype)


def keep_in_cache(tensor: TensorInputs, keep: bool) -> None:
    """Whether reading ``tensor``'s other models leaves their bytes in the page cache: while a first pass will
    be followed by another read of the same blocks."""
    for rows in tensor.inputs:
        for model in (rows, getattr(rows, "model", None)):
            if isinstance(model, ModelRows):
                model.keep_cache = keep


def _resolved_params(method: ModelMergeMethod, request: MergeRequest, key: str,
                     num_layers: int) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Per input and shared parameters for tensor ``key``, as mergekit looks them up: an input's own setting,
    else the shared ``parameters:`` (for a per-input parameter too), else the method's default. A filter list
    that matches no filter resolves to None: the next of these applies."""
    per_input_names = {p.name for p in method.params if p.per_input}

    def resolved(*settings: dict) -> dict[str, object]:
        out: dict[str, object] = {}
        for setting in settings:
            for name, value in setting.items():
                if out.get(name) is None:
                    out[name] = resolve_param(value, key, num_layers)
        return {name: value for name, value in out.items() if value is not None}

    shared_given = {k: v for k, v in request.params.items() if k in per_input_names}
    per_input = [resolved(i.params, shared_given) for i in request.inputs]
    shared = resolved({k: v for k, v in request.params.items() if k not in per_input_names})
    return per_input, shared


def _with_defaults(method: ModelMergeMethod, per_input: list[dict[str, object]],
                   shared: dict[str, object]) -> tuple[list[dict[str, object]], dict[str, object]]:
    defaults = {p.name: p.default for p in method.params if p.default is not REQUIRED}
    per_names = {p.name for p in method.params if p.per_input}
    return ([{**{k: v for k, v in defaults.items() if k in per_names}, **given} for given in per_input],
            {**{k: v for k, v in defaults.items() if k not in per_names}, **shared})


def models_card(plan: MergePlan) -> str:
    """README.md of a model merge: method, parameters, seed and inputs (the recipe is beside it, as mergekit
    writes it: mergekit_config.yml)."""
    from ..version import __version__

    request = plan.request
    method = get_merge_method(request.method)
    rows = [f"| `{i.text}` | {_params_text(i.params) or '-'} |" for i in request.inputs]
    merged = sum(1 for t in plan.tensors if t.fold is not None)
    return (f"---\nbase_model: {plan.base}\nlibrary_name: transformers\ntags:\n- ftserve\n- merge\n---\n\n"
            f"# Merged model\n\n{len(request.inputs)} model(s) merged by {method.title} (`{method.name}`, "
            f"[paper]({method.reference})) over base `{plan.base}` into {merged} weight tensors by ftserve "
            f"{__version__} (`ftserve merge`).\n\n| input | parameters |\n|---|---|\n" + "\n".join(rows)
            + f"\n\n- method: {method.name}\n- parameters: {_params_text(request.params) or 'defaults'}\n"
            f"- seed: {request.seed}\n- dtype: {plan.dtype_name}"
            + (f" (arithmetic in {request.dtype})" if request.dtype else "")
            + f"\n- shards: {len(plan.shards)}, {plan.total_bytes:,d} bytes of weights\n- tool: ftserve "
            f"{__version__}\n\nThe recipe is in `mergekit_config.yml`. Load the model with "
            f"`transformers.AutoModelForCausalLM.from_pretrained(path)`; no ftserve needed.\n")


def _params_text(params: dict) -> str:
    def text(value) -> str:
        return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)

    return ", ".join(f"{name}={text(value)}" for name, value in params.items())
