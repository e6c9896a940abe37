"""Adapter folders in PEFT's layout: read, validate, save, load onto a model, export as plain LoRA.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's keys
(``base_model.model.<module>.lora_A.weight``, ``...vera_lambda_b``, ``base_model.vera_A``), so PEFT,
transformers and vLLM read it. Our exact settings live under the ``"ftserve"`` config key, which PEFT and
vLLM ignore. Delta-LoRA, which PEFT has no type for, is written as its exact rank-2r plain LoRA, with the
training state (A, B and the start snapshot) beside it in ``delta_lora_state.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import EXTRA_KEY, FineTuningConfig
from .errors import AdapterFileError, ConfigError
from .methods import METHODS, LoraFactors, get_method
from .methods.vera import VeraProjection

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
DELTA_STATE = "delta_lora_state.safetensors"
PREFIX = "base_model.model."
SHARED = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
SUFFIXES = tuple(sorted({key for method in METHODS.values() for key in method.saved_keys}))


@dataclass
class AdapterFolder:
    """The parsed contents of an adapter folder, without a model."""

    path: Path
    config: FineTuningConfig
    raw_config: dict
    modules: dict[str, dict[str, Tensor]]
    shared: dict[str, Tensor] = field(default_factory=dict)

    @property
    def extra(self) -> dict:
        return self.raw_config.get(EXTRA_KEY) or {}

    def in_features(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.extra.get("module_in_features") or {}).items()}

    def lora_factors(self, in_features: dict[str, int] | None = None) -> dict[str, LoraFactors]:
        """Exact plain-LoRA factors of every module. VeRA needs each layer's input size (recorded by us)."""
        method = get_method(self.config.method)
        sizes = {**self.in_features(), **(in_features or {})}
        shared = self.shared
        if self.config.method == "vera" and not shared:
            shared = self._regenerate_vera_pair(sizes)
        factors = {}
        for name, state in self.modules.items():
            try:
                factors[name] = method.export_factors(state, shared, self.config, name, sizes.get(name))
            except ValueError as exc:
                raise AdapterFileError(f"{self.path}: {exc}; pass the base model to supply layer sizes") from None
        return factors

    def _regenerate_vera_pair(self, sizes: dict[str, int]) -> dict[str, Tensor]:
        if set(sizes) < set(self.modules):
            raise AdapterFileError(f"{self.path}: VeRA adapter saved without its projections and without layer "
                                   f"sizes; pass the base model")
        shapes = [(s["vera_lambda_b"].shape[0], sizes[n]) for n, s in self.modules.items()]
        pair = get_method("vera").create_shared(self.config, shapes)
        return {"vera_A": pair.vera_A, "vera_B": pair.vera_B}


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterFolder:
    """Parse and check an adapter folder; AdapterFileError names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter folder")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{path}: missing {ADAPTER_CONFIG}; not a PEFT adapter folder")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path}: not valid JSON ({exc})") from None
    try:
        config = config_from_dict(raw)
    except ConfigError as exc:
        raise AdapterFileError(f"{config_path}: {exc}") from None
    tensors = _read_tensors(path, allow_pickle)
    if config.method == "delta-lora" and (path / DELTA_STATE).exists():
        tensors = _load_safetensors(path / DELTA_STATE)
    elif config.method == "delta-lora":
        raise AdapterFileError(f"{path}: Delta-LoRA adapter without {DELTA_STATE}, which holds its exact training "
                               f"state; use `ftserve export` output to serve it as a plain LoRA instead")
    modules: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        if key in SHARED:
            shared[SHARED[key]] = tensor
            continue
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            unknown.append(key)
            continue
        modules.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = tensor
    if unknown:
        raise AdapterFileError(f"{path}: tensors this {config.method} adapter cannot use: {unknown[:3]}"
                               f"{' ...' if len(unknown) > 3 else ''}")
    if not modules:
        raise AdapterFileError(f"{path}: {ADAPTER_WEIGHTS} holds no adapter tensors")
    return AdapterFolder(path, config, raw, modules, shared)


def config_from_dict(raw: dict) -> FineTuningConfig:
    """Our own exact config when we wrote the folder, PEFT's fields otherwise."""
    ours = (raw.get(EXTRA_KEY) or {}).get("config") if isinstance(raw, dict) else None
    if ours:
        known = {f.name for f in dataclasses.fields(FineTuningConfig)}
        return FineTuningConfig(**{k: v for k, v in ours.items() if k in known})
    return FineTuningConfig.from_peft_dict(raw)


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        return _load_safetensors(weights)
    if (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise AdapterFileError(f"{path}: only a pickled {ADAPTER_PICKLE}; refusing to unpickle it. Convert it "
                                   f"to safetensors, or allow pickles (read with weights_only=True)")
        try:
            return torch.load(path / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterFileError(f"{path / ADAPTER_PICKLE}: cannot be read safely ({exc})") from None
    raise AdapterFileError(f"{path}: missing {ADAPTER_WEIGHTS}")


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{file}: corrupt or unreadable safetensors file ({exc})") from None


# Loading onto a model ---------------------------------------------------------------------------

def load_adapter(base_model: torch.nn.Module, path: str | os.PathLike, is_trainable: bool = False,
                 allow_pickle: bool = False):
    """Inject the folder's adapter into ``base_model`` and load its tensors. On any mismatch the base model
    is left exactly as it was and AdapterFileError lists every problem."""
    from .model import FineTuningModel

    folder = read_adapter(path, allow_pickle)
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    try:
        model = FineTuningModel(base_model, folder.config, module_names=sorted(folder.modules))
    except ConfigError as exc:
        raise AdapterFileError(f"{folder.path}: does not fit this model: {exc}") from None
    try:
        load_tensors(model, folder)
    except AdapterFileError:
        _restore(model, flags)
        raise
    model.steps_done = int(folder.extra.get("steps_done", 0))
    if not is_trainable:
        for param in model.adapter_parameters():
            param.requires_grad_(False)
        model.eval()
    return model


def load_tensors(model, folder: AdapterFolder) -> None:
    problems = []
    for name, layer in model.adapter_layers.items():
        state = folder.modules[name]
        layer.prepare_for_state(set(state))
        expected = {k: tuple(v.shape) for k, v in layer.adapter_state().items()}
        for key, shape in expected.items():
            if key not in state:
                problems.append(f"{name}.{key} is missing")
            elif tuple(state[key].shape) != shape:
                problems.append(f"{name}.{key} has shape {tuple(state[key].shape)}, this model needs {shape}")
        problems += [f"{name}.{key} is not used by {folder.config.method}" for key in set(state) - set(expected)]
    shared = getattr(model, "shared", None)
    if isinstance(shared, VeraProjection) and folder.shared:
        for key in ("vera_A", "vera_B"):
            if key not in folder.shared:
                problems.append(f"base_model.{key} is missing")
        if not problems:
            need_in, need_out = shared.vera_A.shape[1], shared.vera_B.shape[0]
            got_A, got_B = folder.shared["vera_A"], folder.shared["vera_B"]
            if got_A.shape[0] != folder.config.lora_r or got_A.shape[1] < need_in or got_B.shape[0] < need_out:
                problems.append(f"base_model.vera_A/B have shapes {tuple(got_A.shape)}/{tuple(got_B.shape)}, this "
                                f"model needs at least ({folder.config.lora_r}, {need_in})/({need_out}, "
                                f"{folder.config.lora_r})")
    if problems:
        raise AdapterFileError(f"{folder.path}: adapter does not fit this model: " + "; ".join(problems[:8])
                               + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    for name, layer in model.adapter_layers.items():
        layer.load_adapter_state(folder.modules[name])
    if isinstance(shared, VeraProjection) and folder.shared:
        shared.vera_A = folder.shared["vera_A"].to(shared.vera_A.device).float().clone()
        shared.vera_B = folder.shared["vera_B"].to(shared.vera_B.device).float().clone()


def _restore(model, flags: dict[str, bool]) -> None:
    base = model.base_model
    for name, layer in model.adapter_layers.items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    for name, param in base.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))


# Saving -------------------------------------------------------------------------------------------

def save_adapter(model, path: str | os.PathLike) -> None:
    """Write ``model``'s adapter in PEFT's layout; files appear whole or not at all."""
    config: FineTuningConfig = model.config
    layers = model.adapter_layers
    fan_in_fan_out = any(layer.is_conv1d for layer in layers.values())
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    extra = {"config": dataclasses.asdict(config), "steps_done": model.steps_done}
    native = {PREFIX + f"{name}.{key}": t for name, layer in layers.items() for key, t in layer.adapter_state().items()}
    files: dict[str, dict[str, Tensor]] = {}
    if config.method == "delta-lora":
        peft_config, files[ADAPTER_WEIGHTS] = plain_lora(model.lora_factors(), config, targets, fan_in_fan_out)
        peft_config[EXTRA_KEY] = {**peft_config[EXTRA_KEY], **extra, "method": "delta-lora"}
        files[DELTA_STATE] = native
    else:
        if config.method == "vera":
            extra["module_in_features"] = {name: layer.in_features for name, layer in layers.items()}
            if config.save_projection:
                native["base_model.vera_A"] = model.shared.vera_A
                native["base_model.vera_B"] = model.shared.vera_B
        peft_config = config.to_peft_dict(targets, fan_in_fan_out, extra)
        files[ADAPTER_WEIGHTS] = native
    write_adapter_folder(path, peft_config, files)


def plain_lora(factors: dict[str, LoraFactors], config: FineTuningConfig, targets: list[str],
               fan_in_fan_out: bool) -> tuple[dict, dict[str, Tensor]]:
    """A PEFT LoRA (config, tensors) computing exactly ``scale * B @ A`` per module.

    When every module shares one rank and scale, that is ``lora_alpha = scale * r`` with ``use_rslora`` off, so
    readers that ignore rsLoRA or rank patterns compute the right update. Otherwise each scale is baked into B
    and ``lora_alpha = r`` per module (``alpha_pattern`` mirrors ``rank_pattern``).
    """
    kinds = {(f.rank, f.scale) for f in factors.values()}
    tensors: dict[str, Tensor] = {}
    if len(kinds) == 1:
        (r, scale), = kinds
        lora_config = dict(lora_r=r, lora_alpha=scale * r)
        baked = False
    else:
        r = Counter(f.rank for f in factors.values()).most_common(1)[0][0]
        ranks = {name: f.rank for name, f in factors.items() if f.rank != r}
        lora_config = dict(lora_r=r, lora_alpha=float(r), rank_pattern=ranks,
                           alpha_pattern={k: float(v) for k, v in ranks.items()})
        baked = True
    for name, f in factors.items():
        tensors[PREFIX + f"{name}.lora_A.weight"] = f.A.float().contiguous()
        tensors[PREFIX + f"{name}.lora_B.weight"] = (f.B.float() * f.scale if baked else f.B.float()).contiguous()
    plain = FineTuningConfig(method="lora", target_modules=targets,
                             base_model_name_or_path=config.base_model_name_or_path, **lora_config)
    peft_config = plain.to_peft_dict(targets, fan_in_fan_out, {"config": dataclasses.asdict(plain)})
    return peft_config, tensors


def export_adapter(src: str | os.PathLike, dst: str | os.PathLike, in_features: dict[str, int] | None = None,
                   force: bool = False) -> AdapterFolder:
    """Write any method's adapter folder as an exact plain PEFT LoRA; returns the source folder."""
    folder = read_adapter(src)
    factors = folder.lora_factors(in_features)
    fan_in_fan_out = bool(folder.raw_config.get("fan_in_fan_out", False))
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    peft_config, tensors = plain_lora(factors, folder.config, targets, fan_in_fan_out)
    peft_config[EXTRA_KEY]["exported_from"] = folder.config.method
    write_adapter_folder(dst, peft_config, {ADAPTER_WEIGHTS: tensors}, force=force, replace_whole=True)
    return folder


# Atomic output -------------------------------------------------------------------------------------

HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, on any error it vanishes.

    Durable: every file and folder in it is fsynced before the rename and the parent folder after it, so after
    a power cut ``path`` holds the old output or the new one, whole. What a killed writer leaves behind is
    named ``.NAME.tmp-<pid>-<host>-<random>`` (and ``.NAME.old-...`` for a replaced output), and the next
    writer of ``path`` on this host clears it once that pid is gone; a live writer's folders are never touched.
    """
    path = Path(path)
    remove_abandoned(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"
    tmp = _scratch(path, "tmp", token)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        if path.exists():
            old = _scratch(path, "old", token)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            fsync(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(path: Path) -> None:
    """Remove the scratch folders of ``path``'s writers on this host whose process is gone. A writer killed
    between moving the old output aside and moving the new one in left no ``path``: the old one is put back."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-((\d+)-{HOST_TAG}-[0-9a-f]{{8}})")
    dead: dict[str, dict[str, Path]] = {}
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(3))):
            dead.setdefault(match.group(2), {})[match.group(1)] = entry
    for scratch in dead.values():
        if set(scratch) == {"tmp", "old"} and not path.exists():
            os.replace(scratch.pop("old"), path)
        for entry in scratch.values():
            shutil.rmtree(entry, ignore_errors=True)


def _scratch(path: Path, kind: str, token: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{token}"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote; leave its folder alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):  # each folder after what it holds
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter_folder(path: str | os.PathLike, peft_config: dict, files: dict[str, dict[str, Tensor]],
                         force: bool = True, replace_whole: bool = False) -> None:
    """Write config, tensors and a model card. A new folder appears whole; in an existing one (re-saving a
    checkpoint) each file is replaced atomically and other files are left alone."""
    path = Path(path)
    target_exists = path.exists()
    if target_exists and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a folder")
    with atomic_output_dir(path if replace_whole or not target_exists else
                           path.parent / f".{path.name}.staging", force=force) as tmp:
        for name, tensors in files.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name),
                      metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_model_card(peft_config))
        for child in tmp.iterdir():
            child.chmod(0o644)
    if target_exists and not replace_whole:
        staging = path.parent / f".{path.name}.staging"
        for child in staging.iterdir():
            os.replace(child, path / child.name)
        fsync(path)
        staging.rmdir()


def _model_card(peft_config: dict) -> str:
    ours = peft_config.get(EXTRA_KEY, {})
    method = ours.get("exported_from") or ours.get("method", "lora")
    return (f"---\nlibrary_name: peft\nbase_model: {peft_config.get('base_model_name_or_path')}\n---\n\n"
            f"# Adapter ({method})\n\nWritten by ftserve {ours.get('version', '')} in PEFT's format "
            f"(peft_type {peft_config['peft_type']}, r={peft_config.get('r')}, targets "
            f"{peft_config.get('target_modules')}).\n\nLoad it with `peft.PeftModel.from_pretrained(base, path)` or "
            f"`ftserve.load_adapter(base, path)`.\n")
