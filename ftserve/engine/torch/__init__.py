"""The embedded engine: one base model, many unmerged adapters, mixed in every batch (see ``engine.py``)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
