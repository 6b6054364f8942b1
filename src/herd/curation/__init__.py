"""Pretraining data curation as in the Llama 3 paper (section 3.1), on datatrove.

Blocks, each configurable and skippable, run in a configured order (:mod:`herd.curation.pipeline`):

- deduplication (:mod:`herd.curation.dedup`): URL (datatrove's exact dedup), near-duplicate
  documents (datatrove's MinHash, with an exact Jaccard check), frequent lines (the paper's rule);
- heuristic filters (:mod:`herd.curation.filters`): datatrove's Gopher repetition and quality
  filters, dirty words, herd's token-distribution KL filter;
- language identification (:mod:`herd.curation.language`): fastText's lid.176.bin or py3langid;
- fastText classifiers (:mod:`herd.curation.classify`): quality, and knowledge buckets whose token
  counts set the data mix (:mod:`herd.curation.mix`);
- decontamination (:mod:`herd.curation.decontaminate`): 8-gram overlap with evaluation sets.

``python -m herd.curate`` runs it; the report is :mod:`herd.curation.report`.
"""

from __future__ import annotations

from loguru import logger as _loguru

from herd.curation.blocks import Block, CurationError, DocumentFilter, Verdict
from herd.curation.pipeline import BLOCK_TYPES, CurationResult, run_curation

_loguru.disable("datatrove")  # datatrove logs every stage with loguru; herd reports through its own log

__all__ = ["BLOCK_TYPES", "Block", "CurationError", "CurationResult", "DocumentFilter", "Verdict", "run_curation"]
