"""MAGMA: a frozen causal language model made multimodal by a visual prefix and adapters.

Eichenberg, Black, Weinbach, Parcalabescu and Frank, "MAGMA -- Multimodal Augmentation of
Generative Models through Adapter-based Finetuning", Findings of EMNLP 2022. Image features of a
vision encoder, (B, P, F), are projected by a trainable linear layer into the LM's embedding space,
passed through dropout and a LayerNorm (MAGMA_v1's image prefix), and prepended to the text
embeddings; bottleneck adapters (ReLU, hidden / 4, after each feed-forward sublayer in MAGMA_v1)
are inserted sequentially in the frozen LM, which is trained with its own language-model loss on
image-caption pairs.

Two site kinds: "tokens", one per model, for the image prefix (hosted at the model's root, where a
forward pre-hook turns input_ids into inputs_embeds, prepends the prefix and extends the attention
mask, token types, positions and labels, with -100 under the prefix); and "sequential" for the
adapters (petlsearch.plugins.adapter's SequentialAdapter, zero-initialised up-projection, so a
fresh adapter is the identity where MAGMA's is near it). The logits keep the prefix positions.

Image features come per batch from `petlsearch.plugins.context.use(image_features=...)`, (B, F) or
(B, P, F), or are computed from `use(pixel_values=...)` by the frozen `encoder` given to the
constructor (its last_hidden_state or tensor output). Without either the prefix is skipped and
only the adapters act, so a text-only batch runs the plain LM with adapters. Gate 0 removes the
prefix (and the adapters at theirs). The prefix is added on a first step only: a forward that
continues from a key/value cache (incremental decoding) finds it in the cache, and only its
positions and attention mask are moved past the prefix, so cached generation gives the logits of
uncached generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.context import extras
from petlsearch.plugins.mechanisms.hooks import PETLModule, cached_length
from petlsearch.plugins.parts.bottleneck import SequentialAdapter, bottleneck_count
from petlsearch.searchspace.dims import Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, sublayer_sites

IGNORE = -100  # label of the prefix positions: no loss there


class ImagePrefix(PETLModule):
    """Prepends LayerNorm(dropout(W f + b)), (B, P, D), to the text embeddings of a causal LM."""

    def __init__(self, site: Site, dropout: float, encoder: nn.Module | None) -> None:
        super().__init__(site)
        self.proj = nn.Linear(site.in_features, site.out_features)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(site.out_features)
        self._encoder = (encoder,)  # a tuple: the frozen encoder is neither a child nor saved
        self._offset = 0  # prefix positions in the KV cache that the current decoding continues

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        self._handles.append(target.register_forward_pre_hook(self._on_input, with_kwargs=True))

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 2:
            features = features[:, None]  # (B, F) -> one prefix token
        if features.shape[-1] != self.site.in_features:
            raise PluginError(f"magma: image features have {features.shape[-1]} dims, the prefix projection "
                              f"expects {self.site.in_features}; construct Magma(image_dim={features.shape[-1]})")
        return self.norm(self.dropout(self.proj(features.to(self.proj.weight.dtype))))  # (B, P, D)

    def image_features(self) -> torch.Tensor | None:
        given = extras()
        if given.get("image_features") is not None:
            return given["image_features"]
        encoder, pixels = self._encoder[0], given.get("pixel_values")
        if encoder is None or pixels is None:
            return None
        with torch.no_grad():
            out = encoder(pixels.to(next(encoder.parameters()).device))
        return getattr(out, "last_hidden_state", out)

    def _on_input(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        cached = cached_length(kwargs)
        if cached:
            return self._continue(args, kwargs, cached)
        self._offset = 0
        if self.gate_off:
            return None
        features = self.image_features()
        if features is None:
            return None
        kwargs = dict(kwargs)
        if args:  # input_ids given positionally
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, D)
        prefix = self.gated(self.prefix(features.to(embeds.device))).to(embeds.dtype)  # (B, P, D)
        if prefix.shape[0] != embeds.shape[0]:
            raise PluginError(f"magma: {prefix.shape[0]} images for a batch of {embeds.shape[0]} texts")
        kwargs["inputs_embeds"] = torch.cat([prefix, embeds], dim=1)
        _extend(kwargs, prefix.shape[1])
        self._offset = prefix.shape[1]
        return args, kwargs

    def _continue(self, args: tuple, kwargs: dict, cached: int) -> tuple | None:
        """A decoding step after the first: `generate` counts positions and builds the mask for the
        text alone, but the cache also holds the prefix, so both move past its positions."""
        if not self._offset:
            return None
        kwargs = dict(kwargs)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions + self._offset
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] < cached + _new_tokens(args, kwargs):
            pad = torch.ones(mask.shape[0], self._offset, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([pad, mask], dim=1)
        return args, kwargs


def _new_tokens(args: tuple, kwargs: dict) -> int:
    ids = args[0] if args else kwargs.get("input_ids")
    return int((ids if ids is not None else kwargs["inputs_embeds"]).shape[1])


def _extend(kwargs: dict, p: int) -> None:
    """Prepend p positions to the per-token inputs: attended, token type 0, no loss, positions 0..p-1."""
    fills = {"attention_mask": 1, "token_type_ids": 0, "labels": IGNORE}
    for name, fill in fills.items():
        value = kwargs.get(name)
        if value is not None:
            pad = torch.full((value.shape[0], p), fill, dtype=value.dtype, device=value.device)
            kwargs[name] = torch.cat([pad, value], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        head = torch.arange(p, device=positions.device).expand(positions.shape[0], p)
        kwargs["position_ids"] = torch.cat([head, positions + p], dim=1)


class Magma(Plugin):
    name = "magma"
    description = "Visual prefix (projected image features) + bottleneck adapters in a frozen causal LM"
    paper = ("Eichenberg et al., MAGMA: Multimodal Augmentation of Generative Models through "
             "Adapter-based Finetuning, Findings of EMNLP 2022")
    kinds = ("tokens", "sequential")
    recipe = Recipe(lr=8e-4, source=(
        "Eichenberg et al. train MAGMA's adapters and image prefix at 8e-4 (not measured here: no image-text "
        "decoder installs offline)"))
    identity_at_init = False  # the image prefix conditions the LM from the start (adapters are identity)

    def __init__(self, image_dim: int = 768, encoder: nn.Module | None = None,
                 sublayers: tuple[str, ...] = ("ffn",), dropout: float = 0.1, max_bottleneck: int = 1024) -> None:
        self.image_dim = image_dim
        self.encoder = encoder
        self.sublayers = sublayers
        self.dropout = dropout
        self.max_bottleneck = max_bottleneck

    def sites(self, graph: Any) -> list[Site]:
        if graph.stacks != ["decoder"] or not graph.find(role="embed"):
            return []  # a decoder-only (causal) language model
        hidden = graph.hidden_size("decoder")
        prefix = Site(name="decoder.image_prefix", kind="tokens", path="", role="embed", stack="decoder",
                      in_features=self.image_dim, out_features=hidden)
        return [prefix, *sublayer_sites(graph, "sequential", self.sublayers)]

    def dims(self, site: Site) -> dict[str, Dim]:
        if site.kind == "tokens":
            return {}
        high = max(1, min(self.max_bottleneck, site.out_features))
        return {"bottleneck": IntDim("bottleneck", default=max(1, min(high, site.out_features // 4)), low=1,
                                     high=high, log=True, help="adapter width (MAGMA: hidden / 4)")}

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        d = site.out_features
        if site.kind == "tokens":
            return site.in_features * d + d + 2 * d  # projection and LayerNorm
        return bottleneck_count(d, cfg["bottleneck"], d)

    def build(self, site: Site, cfg: dict[str, Any]) -> PETLModule:
        if site.kind == "tokens":
            return ImagePrefix(site, self.dropout, self.encoder)
        return SequentialAdapter(site, {"bottleneck": cfg["bottleneck"], "activation": "relu"})

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        if site.kind == "tokens":  # features, projection output, normalised prefix (per token, upper bound)
            return shape.tokens * (site.in_features + 2 * site.out_features)
        return shape.tokens * (site.out_features + 2 * cfg["bottleneck"])
