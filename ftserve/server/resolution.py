"""Adapters loaded on first use: a request whose ``model`` names a folder under ``--adapter-root`` that is not
loaded yet loads it, then runs (LoRAX's dynamic adapter loading, vLLM's filesystem LoRA resolver).

The name is the folder's path relative to the root (``my-task``, ``team/my-task``), and the adapter keeps it as
its served name. The load goes through the same steps as POST /v1/load_lora_adapter: the path is confined to the
root (403), every file of the folder is checked against it by the engine, now and on every re-read, and the
engine validates the adapter (400 naming the problem). A name that is no folder under the root, or a folder
that is not an adapter, is the usual 404, with the reason. Only the requests for that adapter wait while it
loads; concurrent first requests for one adapter share one load, and a request that goes away while it
waits does not cancel the load the others wait for. It lives in the server, above the engine seam, so every
engine gets it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..engine.base import Engine
from ..engine.errors import AdapterExistsError
from ..errors import AdapterFileError
from .errors import APIError, from_exception, model_not_found
from .metrics import ServerMetrics
from .security import confine

ADAPTER_CONFIG = "adapter_config.json"


class AdapterResolver:
    def __init__(self, engine: Engine, root: Path, metrics: ServerMetrics) -> None:
        self.engine, self.root, self.metrics = engine, root, metrics
        self._loading: dict[str, asyncio.Future] = {}

    async def load(self, name: str) -> None:
        """Load ``name`` from the root unless a load of it is under way already; raise what the load raised."""
        task = self._loading.get(name)
        if task is None:
            task = self._loading[name] = asyncio.ensure_future(self._load(name))
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        await asyncio.shield(task)

    async def _load(self, name: str) -> None:
        if any(info.name == name for info in self.engine.list_adapters()):
            return  # loaded meanwhile, through the load API or another name's path
        path = confine(self.root, name, param="model")
        if not path.is_dir():
            raise self._not_found(name, f"no adapter of that name is loaded and {self.root}/{name} is not a folder")
        if not (path / ADAPTER_CONFIG).is_file():
            raise self._not_found(name, f"{self.root}/{name} is a folder but not an adapter: it has no "
                                        f"{ADAPTER_CONFIG}")
        self.metrics.loads_on_first_use.inc()
        try:
            await self.engine.load_adapter(name, str(path), root=self.root)
        except AdapterExistsError:
            return  # the load API won the race with the same name: serve what it loaded
        except AdapterFileError as exc:  # AdapterLoadError is one
            raise from_exception(exc, param="model") from exc  # the folder `model` names is not servable


    def _not_found(self, name: str, why: str) -> APIError:
        """The usual 404, its reason, and the closest names served (a typo of a loaded adapter's name)."""
        served = [self.engine.model_name, *(info.name for info in self.engine.list_adapters())]
        return model_not_found(name, served, why=why)
