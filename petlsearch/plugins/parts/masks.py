"""Top-k selection of scored weight entries, for plugins that train a fixed sparse mask (FISH, DSEE).
"""

from __future__ import annotations

import torch

from petlsearch.searchspace.sites import Site


def param_name(site: Site) -> str:
    return f"{site.path}.{site.param or 'weight'}" if site.path else site.param or "weight"


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores, sorted (for a cache-friendly scatter)."""
    return scores.flatten().topk(k).indices.sort().values


