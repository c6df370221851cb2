"""The unified view as one searchable plugin (He et al., "Towards a Unified View of Parameter-Efficient
Transfer Learning", ICLR 2022).

He et al. describe adapters, prefix tuning and LoRA as one update h <- h + s * delta(x) that differs
along four design dimensions; here each dimension is a site kind, a site role or a dim, so a strategy
searches insertion form x representation x functional form x scaling by choosing sites and configs:

- insertion form -> site kind: `sequential` (delta reads the sublayer's output, Houlsby adapter) or
  `parallel` (delta reads the sublayer's input and is added to its output, parallel adapter / LoRA).
  Prefix tuning is parallel at the level of attention heads: the `kv_prefix` kind.
- modified representation -> site role: `attn` (the attention sublayer, its output projection
  attn.o) or `ffn` (the FFN sublayer, ffn.down); `kv_prefix` sites modify the attention heads.
- functional form -> dims `form` and `activation` on sequential / parallel sites: "adapter" is
  up(act(down(x))) with biases (zero up-projection); "lora" is the linear low-rank B A x without
  biases (Kaiming A, zero B), for which `activation` is unused. On kv_prefix sites the form is the
  paper's softmax gating of prefix tuning, sized by `length` (and trained through the prefix MLP when
  `reparam`, see prefix_tuning.py).
- composition / scaling -> dims `scaling_mode` and `scaling`: "fixed" multiplies delta by the
  constant `scaling` (LoRA's alpha / r, the scaled parallel adapter's s = 4); "learned" makes s one
  trainable scalar initialised at `scaling`. kv_prefix sites scale by the softmax's lambda itself.

Sequential and parallel modules start as the identity; prefixes do not, so the plugin is not the
identity at init when kv_prefix sites are placed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import ParallelDelta, PETLModule, SequentialDelta
from petlsearch.plugins.parts import prefix as pt
from petlsearch.plugins.parts.bottleneck import ACTIVATIONS, Bottleneck, bottleneck_count
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, attention_sites, sublayer_sites

FORMS = ("adapter", "lora")
SCALINGS = ("fixed", "learned")


class LowRank(nn.Module):
    """B A x: (..., in) -> (..., out), rank r, no biases; B starts at zero."""

    def __init__(self, fin: int, rank: int, fout: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, fin))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(fout, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class _Branch:
    """delta(x) = s * f(x) with f of the chosen form; mixed into Sequential / ParallelDelta."""

    def _make(self, fin: int, fout: int, cfg: dict[str, Any]) -> None:
        if cfg["form"] == "lora":
            self.fn = LowRank(fin, cfg["bottleneck"], fout)
        else:
            self.fn = Bottleneck(fin, cfg["bottleneck"], fout, cfg["activation"])
        if cfg["scaling_mode"] == "learned":
            self.scale = nn.Parameter(torch.tensor(float(cfg["scaling"])))
        else:
            self.scale = float(cfg["scaling"])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.scale

    @property
    def child_name(self) -> str:  # a sequential and a parallel module may share attn.o / ffn.down
        return f"{PETLModule.child_name.fget(self)}_{self.site.kind}"


class SequentialBranch(_Branch, SequentialDelta):
    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        SequentialDelta.__init__(self, site)
        self._make(site.out_features, site.out_features, cfg)


class ParallelBranch(_Branch, ParallelDelta):
    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        ParallelDelta.__init__(self, site)
        self._make(site.in_features, site.out_features, cfg)


class UnifiedView(pt.PrefixSharing, Plugin):
    name = "unified"
    description = "He et al.'s design space: insertion form x representation x functional form x scaling"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    kinds = ("sequential", "parallel", "kv_prefix")
    recipe = Recipe(lr=3e-4, source=(
        "swept 1e-4..1e-3 on MiniLM, 100 steps, seed 0: 3e-4 best (0.648 validation accuracy) (python -m "
        "bench --only recipes)"))
    identity_at_init = False  # sequential / parallel branches are; prefixes are not

    def __init__(self, sublayers: tuple[str, ...] = ("attn", "ffn"), max_bottleneck: int = 512,
                 prefix_length: int = 30, mlp_hidden: int = 800) -> None:
        self.sublayers = sublayers
        self.max_bottleneck = max_bottleneck
        self.prefix_length = prefix_length
        self.mlp_hidden = mlp_hidden

    def sites(self, graph: Any) -> list[Site]:
        sites = sublayer_sites(graph, "sequential", self.sublayers) + sublayer_sites(graph, "parallel", self.sublayers)
        roles = tuple(r for r in self.sublayers if r in ("attn", "xattn"))
        return sites + (attention_sites(graph, "kv_prefix", roles=roles) if roles else [])

    def dims(self, site: Site) -> dict[str, Dim]:
        if site.kind == "kv_prefix":
            return pt.prefix_dims(site, self.prefix_length, self.mlp_hidden)
        high = max(1, min(self.max_bottleneck, site.in_features, site.out_features))
        return {
            "form": ChoiceDim("form", default="adapter", choices=FORMS,
                              help="functional form: bottleneck adapter or linear low-rank (LoRA-style)"),
            "bottleneck": IntDim("bottleneck", default=min(16, high), low=1, high=high, log=True,
                                 help="bottleneck width / rank r"),
            "activation": ChoiceDim("activation", default="relu", choices=tuple(ACTIVATIONS),
                                    help="non-linearity of the adapter form (unused by lora)"),
            "scaling_mode": ChoiceDim("scaling_mode", default="fixed", choices=SCALINGS,
                                      help="composition: a fixed scale or a learned scalar"),
            "scaling": FloatDim("scaling", default=4.0 if site.kind == "parallel" else 1.0, low=0.1, high=16.0,
                                log=True, help="the fixed scale s, or the learned scale's initial value"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        if site.kind == "kv_prefix":
            return pt.prefix_count(site, cfg)
        fin = site.out_features if site.kind == "sequential" else site.in_features
        r, fout = cfg["bottleneck"], site.out_features
        n = r * (fin + fout) if cfg["form"] == "lora" else bottleneck_count(fin, r, fout)
        return n + (cfg["scaling_mode"] == "learned")

    def build(self, site: Site, cfg: dict[str, Any]) -> PETLModule:
        if site.kind == "kv_prefix":
            return pt.build_prefix(self, site, cfg)
        return SequentialBranch(site, cfg) if site.kind == "sequential" else ParallelBranch(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        if site.kind == "kv_prefix":
            return pt.prefix_activations(site, cfg, shape)
        fin = site.out_features if site.kind == "sequential" else site.in_features
        inner = cfg["bottleneck"] * (2 if cfg["form"] == "adapter" else 1)
        return shape.tokens * (fin + inner)
