"""Which runner serves which transformers model type."""

from __future__ import annotations

from torch import nn

from ...errors import ServingError
from .gpt2_runner import Gpt2Runner
from .llama_runner import LlamaRunner
from .runner import Runner

RUNNERS: dict[str, type[Runner]] = {t: cls for cls in (LlamaRunner, Gpt2Runner) for t in cls.model_types}


def runner_class(model: nn.Module) -> type[Runner]:
    """The runner for ``model``'s architecture; a ServingError naming it when the engine has none."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in RUNNERS:
        raise ServingError(f"the embedded engine runs {', '.join(sorted(RUNNERS))} models; this base is "
                           f"{model_type!r}. Serve it with the vLLM engine, or merge the adapter and use "
                           f"transformers")
    return RUNNERS[model_type]
