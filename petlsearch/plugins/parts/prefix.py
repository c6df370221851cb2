"""Prefix tuning's prefix (Li & Liang, ACL 2021): keys and values for the kv_prefix mechanism, direct or
through the reparameterisation MLP whose first part is shared by an attention kind's placements;
prefix tuning, the MAM adapter and the unified view place it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.kv_prefix import KVPrefix
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.sites import Site


class PrefixMLP(nn.Module):
    """The shared part of the reparameterisation: tanh(Linear(d, h)(P')), P' of shape (l, d)."""

    def __init__(self, length: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, dim))  # N(0, 1), as nn.Embedding
        self.proj = nn.Linear(dim, hidden)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.proj(self.embedding))  # (l, h)


class PrefixModule(KVPrefix):
    """Keys and values (kv_heads, l, head_dim), direct or from the shared MLP and this layer's block."""

    def __init__(self, site: Site, cfg: dict[str, Any], shared: PrefixMLP | None = None) -> None:
        super().__init__(site)
        self.length, self.kv_heads, self.head_dim = cfg["length"], site.get("kv_heads"), site.get("head_dim")
        kv_dim = self.kv_heads * self.head_dim
        if cfg["reparam"]:
            self.shared_mlp = shared
            self.out = nn.Linear(cfg["mlp_hidden"], 2 * kv_dim)  # this layer's block of the MLP's last layer
        else:
            self.key = nn.Parameter(torch.randn(self.kv_heads, self.length, self.head_dim))
            self.value = nn.Parameter(torch.randn(self.kv_heads, self.length, self.head_dim))

    @property
    def reparameterised(self) -> bool:
        return getattr(self, "out", None) is not None

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reparameterised:
            return self.key, self.value
        kv = self.out(self.shared_mlp())  # (l, 2 * kv_heads * hd)
        kv = kv.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, kv_heads, l, hd)
        return kv[0], kv[1]

    def freeze_prefix(self, trainable: bool = False) -> PrefixModule:
        """Compute the prefix once, keep it as `key` / `value`, and drop the reparameterisation MLP."""
        if self.reparameterised:
            with torch.no_grad():
                k, v = self.prefix()
            del self.out
            del self.shared_mlp
            self.key = nn.Parameter(k.detach().clone(), requires_grad=trainable)
            self.value = nn.Parameter(v.detach().clone(), requires_grad=trainable)
        return self


# ------------------------------------------------------------------ helpers shared with MAM / unified
def prefix_dims(site: Site, length: int = 10, mlp_hidden: int = 512, max_length: int = 256) -> dict[str, Dim]:
    return {
        "length": IntDim("length", default=min(length, max_length), low=1, high=max_length, log=True,
                         help="number l of prefix keys/values per attention"),
        "reparam": ChoiceDim("reparam", default=True, choices=(True, False),
                             help="train through the shared embedding + tanh MLP (the paper) or directly"),
        "mlp_hidden": IntDim("mlp_hidden", default=mlp_hidden, low=16, high=2048, log=True,
                             help="hidden width h of the reparameterisation MLP"),
    }


def _kv_dim(site: Site) -> int:
    return site.get("kv_heads") * site.get("head_dim")


def prefix_count(site: Site, cfg: dict[str, Any]) -> int:
    """Per placement: its block of the MLP's last layer, or the direct keys and values."""
    if cfg["reparam"]:
        return (cfg["mlp_hidden"] + 1) * 2 * _kv_dim(site)
    return 2 * cfg["length"] * _kv_dim(site)


def prefix_shared_key(site: Site, cfg: dict[str, Any]) -> Any:
    if not cfg["reparam"]:
        return None
    return ("prefix_mlp", site.stack, site.role, cfg["length"], site.in_features, cfg["mlp_hidden"])


def prefix_shared_count(site: Site, cfg: dict[str, Any]) -> int:
    """The embedding P' (l x d) and the first Linear (d -> h), once per shared key."""
    if not cfg["reparam"]:
        return 0
    d, h = site.in_features, cfg["mlp_hidden"]
    return cfg["length"] * d + d * h + h


class PrefixSharing:
    """Mixin for composite plugins (MAM, the unified view) that also place prefixes on kv_prefix
    sites: the prefix's reparameterisation MLP is shared, the plugin's other modules are not."""

    def shared_key(self, site: Site, cfg: dict[str, Any]) -> Any:
        return prefix_shared_key(site, cfg) if site.kind == "kv_prefix" else None

    def shared_count(self, site: Site, cfg: dict[str, Any]) -> int:
        return prefix_shared_count(site, cfg) if site.kind == "kv_prefix" else 0


def build_prefix(plugin: Plugin, site: Site, cfg: dict[str, Any]) -> PrefixModule:
    shared = None
    if cfg["reparam"]:
        shared = plugin.shared(prefix_shared_key(site, cfg),
                               lambda: PrefixMLP(cfg["length"], site.in_features, cfg["mlp_hidden"]))
    return PrefixModule(site, cfg, shared)


def prefix_activations(site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
    """Attention probabilities over the prefix (B, heads, T, l) and the concatenated prefix keys and
    values (B, kv_heads, l, hd) x 2 that backward keeps."""
    heads = site.get("heads") or 1
    return shape.batch * cfg["length"] * (heads * shape.seq + 2 * _kv_dim(site))


