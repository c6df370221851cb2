"""Soft prompts: how long one may be beside the input, and Lester et al.'s initialisation from the
frozen vocabulary (prompt tuning, ATTEMPT).
"""

from __future__ import annotations

import torch
from torch import nn

from petlsearch.searchspace.sites import Site

INITS = ("random", "vocab")


def max_prompt_length(site: Site, cap: int) -> int:
    """Prompts share an absolute position table with the input: leave it half of the positions."""
    table = site.get("max_positions")
    return max(1, min(cap, table // 2)) if table else cap


def init_from_vocab(prompt: torch.Tensor, model: nn.Module, site: Site) -> None:
    """Overwrite `prompt` (n, H) with rows sampled from the stack's frozen word-embedding table."""
    table = model.get_submodule(site.get("embed")).weight  # (V, H)
    if table.device.type == "meta":
        return
    rows = torch.randint(0, table.shape[0], (prompt.shape[0],), device=table.device)
    with torch.no_grad():
        prompt.copy_(table[rows].to(prompt.dtype))


