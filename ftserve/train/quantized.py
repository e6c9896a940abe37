"""Loading the base model for training, in 4 bits for QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

The paper's recipe: bitsandbytes NF4 weights with double quantization of the quantization constants and bf16
compute. Every ``Linear`` except the output head becomes a ``bnb.nn.Linear4bit`` (a subclass of
``nn.Linear``), which every method wraps as it wraps a full-precision layer; the adapter's own tensors stay in
fp32. bitsandbytes >= 0.46 runs this on CPU as well as on GPUs.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, ConfigError

# What adapter_config.json records (under "ftserve") of a base loaded in 4 bits, so a merge can rebuild the
# weights the adapter was trained against.
QLORA_RECIPE = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16"}
BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size, recorded where no quantized layer says otherwise


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Keep bitsandbytes out of whatever runs inside, for work that does not load a base in 4 bits.

    peft imports it whenever it is installed (``peft.helpers``, which transformers' ``trainer_utils`` imports), and
    on a CPU with AVX512-BF16 that import fetches a kernel through the ``kernels`` package and warns twice
    ("Skipping publisher trust check ...", "Failed to load CPU gemm_4bit_forward ... pip install kernels"), for
    a library the command never used. A ``None`` entry in ``sys.modules`` makes ``import bitsandbytes`` fail as if
    it were not installed, and ``importlib.util.find_spec`` answer None, which is how peft, transformers and
    accelerate ask: each goes on as without it. Enter it before transformers' Trainer is imported; an
    already imported bitsandbytes stays."""
    hidden = sys.modules.setdefault("bitsandbytes", None) is None
    try:
        yield
    finally:
        if hidden and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


def quantization_config():
    """transformers' ``BitsAndBytesConfig`` of the QLoRA recipe."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--load-in-4bit needs bitsandbytes: pip install 'finetuning-toolkit[qlora]'") from None
    from transformers import BitsAndBytesConfig

    recipe = dict(QLORA_RECIPE)
    recipe["bnb_4bit_compute_dtype"] = getattr(torch, recipe["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**recipe)


def load_base_model(name: str, load_in_4bit: bool = False, dtype: torch.dtype | None = None,
                    device: str | None = None) -> Any:
    """The causal LM at ``name`` (a folder, or a model id in the local cache), in 4 bits on request."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_4bit:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs.update(quantization_config=quantization_config(), device_map={"": device}, dtype=torch.bfloat16)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot load the base model ({str(exc).splitlines()[0]})") from None


def is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def quantized_base_record(model: torch.nn.Module) -> dict:
    """What a merge needs to rebuild the weights a QLoRA adapter was trained against: the recipe, the block
    size, and which modules were quantized (read before the adapter is injected)."""
    import bitsandbytes as bnb

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    states = [m.weight.quant_state for m in layers.values() if getattr(m.weight, "quant_state", None) is not None]
    return {**QLORA_RECIPE, "blocksize": states[0].blocksize if states else BNB_BLOCKSIZE, "modules": sorted(layers)}
