"""Merge: fold adapters into a base model and write a standalone checkpoint, streaming; then verify it.

``plan`` checks everything and decides every output tensor before a byte is written (``inputs``: for a
mergekit-style merge of full models, ``model+adapter`` pairs and adapters, with a method of methods.py),
``write`` writes the plan tensor by tensor in bounded memory, ``verify`` compares the merged model with the
unmerged one (or recomputes a model merge tensor by tensor); ``approximate``
writes the best rank-R plain LoRA of a merged delta (for an adapter with no exact plain-LoRA export).
"""

from .approximate import ApproximateExport, export_approximate
from .plan import AdapterSpec, MergePlan, plan_merge
from .verify import ModelsReport, verify_merge, verify_models
from .write import MergeResult, merge_checkpoint, merge_models

__all__ = ["AdapterSpec", "ApproximateExport", "MergePlan", "MergeResult", "ModelsReport", "export_approximate",
           "merge_checkpoint", "merge_models", "plan_merge", "verify_merge", "verify_models"]
