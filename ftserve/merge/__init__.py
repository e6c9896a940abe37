"""Merge: fold adapters into a base model and write a standalone checkpoint, streaming; then verify it.

``plan`` checks everything and decides every output tensor before a byte is written, ``write`` writes the plan
tensor by tensor in bounded memory, ``verify`` compares the merged model with the unmerged one; ``approximate``
writes the best rank-R plain LoRA of a merged delta (for an adapter with no exact plain-LoRA export).
"""

from .approximate import ApproximateExport, export_approximate
from .plan import AdapterSpec, MergePlan, plan_merge
from .verify import verify_merge
from .write import MergeResult, merge_checkpoint

__all__ = ["AdapterSpec", "ApproximateExport", "MergePlan", "MergeResult", "export_approximate", "merge_checkpoint",
           "plan_merge", "verify_merge"]
