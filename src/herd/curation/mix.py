"""Data-mix weights from the knowledge classifier's bucket counts (paper 3.1.2: 50/25/17/8).

Two ways to write the curated data, and the weights that reach the target mix with each:

- split by **bucket** (``general.jsonl``, ``math.jsonl``...): each bucket is a source, so its weight
  is its target share (renormalised over the buckets that hold data). The report also says how far
  that is from the natural mix: a bucket's upsampling factor is its target share over its share
  of the tokens.
- split by **source**: each source holds a mixture of buckets. With ``c[s, b]`` the share of
  source ``s``'s tokens in bucket ``b``, the weights ``w`` solve ``min |c^T w - target|`` with
  ``w >= 0`` (non-negative least squares, then scaled to sum to 1); the report gives the mix they
  reach.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import nnls

LLAMA3_MIX = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}


def bucket_weights(tokens: Mapping[str, int], target: Mapping[str, float]) -> dict[str, float]:
    """Weights of bucket sources: the target shares of the buckets that hold tokens, summing to 1."""
    present = {bucket: share for bucket, share in target.items() if tokens.get(bucket, 0) > 0}
    total = sum(present.values())
    return {bucket: share / total for bucket, share in present.items()} if total else {}


def source_weights(tokens: Mapping[str, Mapping[str, int]], target: Mapping[str, float]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Weights of sources (``tokens[source][bucket]``) whose mix comes closest to ``target``.

    Returns (weights per source, the bucket mix they give).
    """
    sources = [s for s in tokens if sum(tokens[s].values()) > 0]
    buckets = sorted({*target, *(b for s in sources for b in tokens[s])})
    if not sources:
        return {}, {}
    shares = np.array([[tokens[s].get(b, 0) / sum(tokens[s].values()) for b in buckets] for s in sources])
    goal = np.array([target.get(b, 0.0) for b in buckets])
    weights, _ = nnls(shares.T, goal)
    if weights.sum() <= 0:
        weights = np.ones(len(sources))
    weights = weights / weights.sum()
    reached = shares.T @ weights
    return ({s: float(w) for s, w in zip(sources, weights, strict=True)},
            {b: float(r) for b, r in zip(buckets, reached, strict=True)})


def natural_mix(tokens: Mapping[str, int]) -> dict[str, float]:
    """Each bucket's share of all tokens."""
    total = sum(tokens.values())
    return {bucket: count / total for bucket, count in tokens.items()} if total else {}
