"""Tip-Adapter: a training-free cache model of few-shot features beside a frozen classifier.

Zhang, Zhang, Fang, Gao, Li, Qiao and Li, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022. The keys of the cache are the L2-normalised features of the few-shot
training set, (N, D); the values their one-hot labels, (N, C). For a test feature f (normalised),
the affinities A = exp(-beta (1 - f K^T)), (B, N), give the cache's logits A V, (B, C), added to the
classifier's: logits = head(f) + alpha * A V. Tip-Adapter-F makes the keys trainable (initialised
from the cache); the values stay fixed.

Site kind "head": the task head (a Linear on pooled features: BERT's or ViT's classifier,
EfficientNet's _fc); language-model heads, which see every token, are not sites. `prepare(model,
batches)` runs the frozen model on labelled batches ('labels' or 'label') and reads the features
that feed the head through a forward pre-hook, keeping at most `max_shots` per class.

The cache has N = shots x C slots, so counts are known before building: class c fills its `shots`
slots with its first cached examples; a class with fewer examples leaves the remaining slots empty
(zero key and zero value: no contribution, and a trainable key there gets no gradient). count = 0
for Tip-Adapter and N * D for Tip-Adapter-F.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import OutputDelta
from petlsearch.searchspace.dims import ChoiceDim, Dim, FloatDim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, head_sites

log = logging.getLogger(__name__)
LABEL_KEYS = ("labels", "label")


class TipCache(OutputDelta):
    """logits -> logits + gate * alpha * exp(-beta (1 - norm(f) K^T)) V, f the head's input."""

    def __init__(self, site: Site, cfg: dict[str, Any], keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(site)
        self.alpha, self.beta = cfg["alpha"], cfg["beta"]
        if cfg["finetune_keys"]:
            self.cache_keys = nn.Parameter(keys.clone())  # (N, D): Tip-Adapter-F
        else:
            self.register_buffer("cache_keys", keys.clone())
        self.register_buffer("cache_values", values.clone())  # (N, C) one-hot, zero rows for empty slots

    def delta(self, f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f, dim=-1)  # (..., D)
        affinity = torch.exp(-self.beta * (1 - f @ self.cache_keys.T))  # (..., N)
        return self.alpha * affinity @ self.cache_values.to(affinity.dtype)  # (..., C)


class TipAdapter(Plugin):
    name = "tip_adapter"
    description = "Training-free few-shot cache model (keys = features, values = labels) beside the head"
    paper = "Zhang et al., Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification, ECCV 2022"
    kinds = ("head",)
    recipe = Recipe(lr=1e-3, source="Zhang et al. fine-tune the cache keys (Tip-Adapter-F) at 1e-3")
    identity_at_init = False  # the cache changes the logits from the start: that is the method
    needs_data = True

    def __init__(self, max_shots: int = 16) -> None:
        self.max_shots = max_shots

    def sites(self, graph: Any) -> list[Site]:
        embeds = [n.in_features for n in graph.find(role="embed") if n.in_features]
        vocab = max(embeds, default=None)
        return [s for s in head_sites(graph) if s.in_features and s.out_features
                and s.out_features != vocab]  # a head as wide as the vocabulary is a language-model head

    def dims(self, site: Site) -> dict[str, Dim]:
        return {
            "shots": IntDim("shots", default=self.max_shots, low=1, high=self.max_shots, log=True,
                            help="cached examples per class (N = shots x classes)"),
            "alpha": FloatDim("alpha", default=1.0, low=0.0, high=10.0, help="weight of the cache's logits"),
            "beta": FloatDim("beta", default=5.5, low=0.1, high=100.0, log=True,
                              help="sharpness of the affinities (its scale depends on how spread the features are)"),
            "finetune_keys": ChoiceDim("finetune_keys", default=False, choices=(False, True),
                                       help="Tip-Adapter-F: train the cache keys"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["shots"] * site.out_features * site.in_features if cfg["finetune_keys"] else 0

    # ------------------------------------------------------------------ the cache
    def prepare(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Run the frozen model on labelled batches and keep, per head, up to `max_shots` normalised
        features per class: self._pool[head path][class] = list of (D,) tensors."""
        from petlsearch.searchspace.graph import ModelGraph

        sites = self.sites(ModelGraph.from_model(model))
        self._pool: dict[str, list[list[torch.Tensor]]] = {s.path: [[] for _ in range(s.out_features)] for s in sites}
        seen: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(s.path).register_forward_pre_hook(
            lambda _m, args, p=s.path: seen.__setitem__(p, args[0].detach())) for s in sites]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
                    if labels is None:
                        raise PluginError("tip_adapter.prepare needs labelled batches (a 'labels' entry)")
                    model(**{k: v.to(device) for k, v in batch.items() if k not in LABEL_KEYS})
                    for path, feats in seen.items():
                        self._add(path, feats, labels)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    def _add(self, path: str, feats: torch.Tensor, labels: torch.Tensor) -> None:
        if feats.dim() != 2 or feats.shape[0] != labels.shape[0]:
            raise PluginError(f"tip_adapter: the head at '{path}' reads features of shape {tuple(feats.shape)} "
                              f"for {labels.shape[0]} labels; it needs pooled (batch, features) inputs")
        pool = self._pool[path]
        for f, y in zip(F.normalize(feats.float(), dim=-1).cpu(), labels.tolist()):
            if 0 <= y < len(pool) and len(pool[y]) < self.max_shots:
                pool[y].append(f)

    def cache(self, site: Site, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (shots*C, D) and one-hot values (shots*C, C); slot c*shots + j holds class c's j-th shot."""
        pool = getattr(self, "_pool", {}).get(site.path)
        if pool is None:
            raise PluginError(f"tip_adapter: no cache for '{site.path}'; call prepare(model, batches) "
                              "with labelled few-shot batches before attaching")
        classes, dim = site.out_features, site.in_features
        keys = torch.zeros(classes * shots, dim)
        values = torch.zeros(classes * shots, classes)
        for c, shots_c in enumerate(pool):
            for j, f in enumerate(shots_c[:shots]):
                keys[c * shots + j] = f
                values[c * shots + j, c] = 1.0
        empty = int((values.sum(1) == 0).sum())
        if empty:
            log.warning("tip_adapter at %s: %d of %d cache slots are empty (classes with fewer than %d shots)",
                        site.key, empty, len(values), shots)
        return keys, values

    def build(self, site: Site, cfg: dict[str, Any]) -> TipCache:
        keys, values = self.cache(site, cfg["shots"])
        return TipCache(site, cfg, keys, values)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        # the normalised features and the affinities, per example (the head reads pooled features)
        return shape.batch * (site.in_features + cfg["shots"] * site.out_features)
