"""LST: a ladder side network beside a frozen backbone (Sung et al., LST: Ladder Side-Tuning for
Parameter and Memory Efficient Transfer Learning, NeurIPS 2022).

A side network of 1/r of the backbone's width has one block per kept backbone layer. Ladders feed
it: after kept layer i, side <- mu_i * side + (1 - mu_i) * down_i(h_i), with mu_i = sigmoid(alpha_i / T),
T = 0.1, and side <- side_block_i(side); the first side state is down_0(embeddings). Layer dropping
keeps every k-th layer counted from the top (`keep_every`). Side blocks start as the backbone's own
blocks pruned to the side width by weight magnitude (the paper's structured "network pruning"
init: the hidden, per-head and FFN dimensions with the largest L1 norms; the hidden units are one
set for the whole side network, as in a pruned network), and the ladders' down-projections start
as the selection of those units, so a fresh side network runs on the backbone's own states. The backbone runs without
gradient, so backward never crosses it: that is where the memory saving comes from. Side blocks
run a memory-lean attention (`mechanisms.lean_attention`): width reduction does not shrink the attention
probabilities (heads x seq^2 per layer), so they are recomputed in backward instead of kept. The final side
state is up-projected and added to the last block's output (before the stack's final norm, which
then normalises both); the up-projection starts at zero, so a fresh module changes nothing.

On an encoder-decoder (T5) the side network has both halves, as in the paper: a side encoder
beside the encoder and a side decoder beside the decoder, whose cross-attention reads the side
encoder's output (through a pruned copy of the encoder's final norm), and only the side decoder's
output is up-projected into the backbone. Backward then crosses no backbone layer at all; a side
encoder alone would send the gradient back through every decoder layer's cross-attention.

Sites: one per stack (`stack_sites`) whose blocks have separate q/k/v projections (BERT, ViT,
CLIP's towers, T5EncoderModel, Llama), and one `encoder+decoder` site on a model whose decoder
cross-attends to an encoder. Under grouped-query attention the side blocks keep the backbone's
q and k / v heads, each cut to head_dim / r on one set of dimensions; under a rotary embedding
that set is closed under the rotation's pairs and the side blocks read the backbone's cos / sin
at those dimensions, so a pruned block attends as its backbone block does on them. While it is
installed, other placements inside those stacks get no gradient. A side decoder (of T5, or of a
decoder-only model) runs without a KV cache: generate with use_cache=False.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.hooks import CACHE_ARGS, PETLModule, cached_length
from petlsearch.plugins.parts.pruning import ROLE_DIMS, hidden_units, prune_block, prune_norm
from petlsearch.searchspace.dims import Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, stack_sites

TEMPERATURE = 0.1  # mu = sigmoid(alpha / T), as the paper


@dataclass(frozen=True)
class StackSpec:
    """One backbone stack a side half runs beside: its block list, the (role, parameter, shape)
    of each block's parameters, its activation profile, (for an encoder that feeds a side
    decoder) its final norm, whose pruned copy normalises the side encoder's output, and the
    graph's role of each module inside a block (by name or from structure), which pruning reads."""

    path: str
    layers: int
    params: tuple[tuple[tuple[str, str, tuple[int, ...]], ...], ...]
    profile: Any = None  # memory.BlockProfile
    norm_path: str | None = None
    norm_params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()  # (path inside a block, role), the same in every block


def side_widths(site: Site, reduction: int) -> dict[str, int]:
    """Widths of the side network: hidden / r, FFN / r, the same heads (q's and k / v's) with
    head_dim / r (even under a rotary embedding, which rotates dimensions in pairs)."""
    heads, head_dim = site.get("heads"), site.get("inner") // site.get("heads")
    kv_heads = site.get("kv_inner", site.get("inner")) // head_dim
    side_head = max(2, head_dim // reduction // 2 * 2) if site.get("rotary") else max(1, head_dim // reduction)
    return {"hidden": max(1, site.in_features // reduction), "ffn": max(1, site.get("ffn") // reduction),
            "inner": heads * side_head, "kv_inner": kv_heads * side_head, "head_dim": side_head}


def kept_layers(layers: int, every: int) -> list[int]:
    """Every `every`-th layer counted down from the last, which is always kept."""
    return [i for i in range(layers) if (layers - 1 - i) % every == 0]


def pruned_numel(role: str, param: str, shape: tuple[int, ...], widths: dict[str, int]) -> int:
    dims = ROLE_DIMS.get(role)
    if dims is None:  # e.g. T5's relative position bias (buckets x heads): heads are kept
        return math.prod(shape)
    out = widths[dims[0]]
    return out * widths[dims[1]] if param == "weight" and dims[1] else out


class SideStack(nn.Module):
    """The side half beside one backbone stack: its first down-projection, ladders, gates and blocks."""

    def __init__(self, hidden: int, side_hidden: int, kept: list[int]) -> None:
        super().__init__()
        self.kept = kept
        self.down_first = nn.Linear(hidden, side_hidden)  # embeddings -> first side state
        self.downs = nn.ModuleList(nn.Linear(hidden, side_hidden) for _ in kept)  # the ladders
        self.alphas = nn.Parameter(torch.zeros(len(kept)))  # mu starts at 0.5
        self.blocks = nn.ModuleList()  # pruned copies of the kept backbone blocks, made at install
        self.norm: nn.Module | None = None  # pruned copy of the stack's final norm (a side encoder's)

    def select(self, hidden: torch.Tensor) -> None:
        """Start every down-projection as the selection of the side network's `hidden` units, so
        that a fresh side network runs its pruned blocks on the backbone's own states (cut to
        those units) rather than on random projections of them."""
        with torch.no_grad():
            for down in (self.down_first, *self.downs):
                down.weight.zero_()
                down.weight[torch.arange(hidden.numel()), hidden.to(down.weight.device)] = 1.0
                down.bias.zero_()

    def ladder(self, k: int, side: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        mu = torch.sigmoid(self.alphas[k] / TEMPERATURE)
        down = self.downs[k](hidden.detach())
        # = mu * side + (1 - mu) * down, written so that backward keeps one side-width tensor
        # (side - down, for mu's gradient) instead of both terms
        return down + mu * (side - down)


class LadderSide(PETLModule):
    """The side network: one half per stack (encoder, or encoder and decoder) and the up-projection
    of the last half's output into the backbone."""

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        self.widths = side_widths(site, cfg["reduction"])
        self.specs: tuple[StackSpec, ...] = site.get("stacks")
        h, hs = site.in_features, self.widths["hidden"]
        self.halves = nn.ModuleList(SideStack(h, hs, kept_layers(spec.layers, cfg["keep_every"]))
                                    for spec in self.specs)
        self.up = nn.Linear(hs, h)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._state: list[torch.Tensor | None] = [None] * len(self.specs)
        self._memory: torch.Tensor | None = None  # the side encoder's output, for the side decoder
        self._grad: list[bool] = []
        self._signatures: list[inspect.Signature] = []

    @property
    def alphas(self) -> nn.Parameter:
        """The gates of the last half (the only one on an encoder)."""
        return self.halves[-1].alphas

    @property
    def downs(self) -> nn.ModuleList:
        return self.halves[-1].downs

    @property
    def blocks(self) -> nn.ModuleList:
        return self.halves[-1].blocks

    # ------------------------------------------------------------------ install
    def install(self, model: nn.Module) -> None:
        last = self.specs[-1].path
        host = model.get_submodule(last.rsplit(".", 1)[0] if "." in last else "")  # not the block list
        stacks = [list(model.get_submodule(spec.path)) for spec in self.specs]
        if not len(self.halves[0].blocks):  # the first install builds the side network; a re-install keeps it
            self._build(model, stacks)
        self._signatures = []  # a re-install (after uninstall) starts afresh
        for j, (blocks, half) in enumerate(zip(stacks, self.halves)):
            self._signatures.append(inspect.signature(half.blocks[0].forward))
            for i, block in enumerate(blocks):
                self._handles.append(block.register_forward_pre_hook(self._pre(j, i), with_kwargs=True))
                self._handles.append(block.register_forward_hook(  # always: restore grad mode on errors too
                    self._post(j, i, last=i == len(blocks) - 1), with_kwargs=True, always_call=True))
        host.add_module(self.child_name, self)
        self._hosts.append(host)

    def _build(self, model: nn.Module, stacks: list[list[nn.Module]]) -> None:
        """Each half's side blocks (pruned copies of its kept backbone blocks, all on one set of
        hidden units), ladders that start as the selection of those units, and final norm."""
        reference = next(self.parameters())
        roles = [dict(spec.roles) for spec in self.specs]  # the graph's: names or structure
        kept = [(blocks[i], r) for blocks, half, r in zip(stacks, self.halves, roles) for i in half.kept]
        hidden = hidden_units([b for b, _ in kept], self.widths["hidden"], [r for _, r in kept])
        for spec, blocks, half, r in zip(self.specs, stacks, self.halves, roles):
            for i in half.kept:
                side = prune_block(blocks[i], self.widths, hidden, rotary=bool(self.site.get("rotary")), roles=r)
                side = side.to(device=reference.device, dtype=reference.dtype)
                half.blocks.append(side.train(self.training))
            half.select(hidden)
            if spec.norm_path is not None:
                norm = prune_norm(model.get_submodule(spec.norm_path), hidden)
                half.norm = norm.to(device=reference.device, dtype=reference.dtype)

    def _pre(self, j: int, i: int) -> Any:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._grad.append(torch.is_grad_enabled())
            if self.gate_off:
                return
            if i == 0:
                if (j > 0 or self.site.get("causal")) and cached_length(kwargs) > 0:
                    raise PluginError("lst: the side decoder keeps no KV cache; generate with use_cache=False")
                x = args[0] if args else kwargs["hidden_states"]
                self._state[j] = self.halves[j].down_first(x.detach())
            torch.set_grad_enabled(False)  # the backbone keeps nothing for backward
        return hook

    def _post(self, j: int, i: int, last: bool) -> Any:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            torch.set_grad_enabled(self._grad.pop() if self._grad else True)
            half = self.halves[j]
            if self.gate_off or self._state[j] is None or out is None:
                return None
            if i in half.kept:
                k = half.kept.index(i)
                x = half.ladder(k, self._state[j], _first(out))
                side_args, side_kwargs = self._side_call(j, x, args, kwargs)
                self._state[j] = _first(half.blocks[k](*side_args, **side_kwargs))
            if not last:
                return None
            side, self._state[j] = self._state[j], None
            if j < len(self.halves) - 1:  # a side encoder: its output feeds the side decoder
                self._memory = half.norm(side) if half.norm is not None else side
                return None
            hidden = _first(out) + self.gated(self.up(side))
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        return hook

    def _side_call(self, j: int, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The backbone block's arguments for the side block: the side state as hidden states, the
        side encoder's output as what a decoder cross-attends to, and no cache."""
        signature = self._signatures[j]
        bound = signature.bind_partial(*args, **kwargs)
        bound.arguments[next(iter(signature.parameters))] = x
        if j > 0 and "encoder_hidden_states" in bound.arguments:
            bound.arguments["encoder_hidden_states"] = self._memory
        for name in CACHE_ARGS:  # a side block must not write the backbone's cache
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = None
        if "use_cache" in bound.arguments:
            bound.arguments["use_cache"] = False
        rope = getattr(self.halves[j].blocks[0], "petl_rope_dims", None)
        if rope is not None and bound.arguments.get("position_embeddings") is not None:
            bound.arguments["position_embeddings"] = tuple(t[..., rope] for t in bound.arguments["position_embeddings"])
        return bound.args, bound.kwargs


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _supported(graph: Any, stack: str) -> bool:
    nodes = [n for n in graph.nodes.values() if n.stack == stack and n.layer is not None]
    linear_roles = {n.role for n in nodes if n.type == "Linear"}
    return {"attn.q", "attn.k", "attn.v"} <= linear_roles and linear_roles <= set(ROLE_DIMS)


def _stack_spec(graph: Any, site: Site, feeds_decoder: bool) -> StackSpec:
    from petlsearch.searchspace.memory import block_profile

    params = tuple(
        tuple((n.role or "", name, shape) for n in graph.nodes.values()
              if n.path.startswith(b.path + ".") for name, shape in n.params.items())
        for b in graph.blocks if b.stack == site.stack)
    norm = None
    if feeds_decoder:  # the stack's own final norm: a norm outside the blocks, not the embeddings'
        norm = next((n for n in graph.find(role="norm", stack=site.stack)
                     if n.layer is None and "embed" not in n.path.lower()), None)
    first = next(b for b in graph.blocks if b.stack == site.stack)
    roles = tuple((n.path[len(first.path) + 1:], n.role) for n in graph.nodes.values()
                  if n.path.startswith(first.path + ".") and n.role in ROLE_DIMS)
    return StackSpec(site.path, len(params), params, block_profile(graph, site.stack),
                     norm.path if norm else None, tuple(norm.params.items()) if norm else (), roles)


class LadderSideTuning(Plugin):
    name = "lst"
    description = "Ladder side network of reduced width fed by the frozen backbone's hidden states"
    paper = "Sung et al., LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, NeurIPS 2022"
    kinds = ("side",)
    recipe = Recipe(lr=1e-3, head_lr=1e-3, source=(
        "Sung et al. train the side network with its head at one rate (3e-3 on T5); on MiniLM a head at 1e-2 "
        "fitted the frozen features first (0.617 validation accuracy, seed 0), at 1e-3 0.732 (python -m bench"
        " --only zoo)"))

    def sites(self, graph: Any) -> list[Site]:
        stacks = {s.stack: s for s in stack_sites(graph, "side") if _supported(graph, s.stack)}
        decoders = {n.stack for n in graph.nodes.values() if n.role == "xattn.q"}
        rotary = any("Rotary" in n.type for n in graph.nodes.values())  # cos / sin passed to every block
        sites = []
        for stack, site in stacks.items():
            if stack in decoders:  # one side network for both: the side decoder reads the side encoder
                encoder = stacks.get("encoder")
                if encoder is None:
                    continue
                specs = (_stack_spec(graph, encoder, feeds_decoder=True), _stack_spec(graph, site, False))
                site = replace(site, name="encoder+decoder")
            elif decoders and stack == "encoder":
                continue  # its half belongs to the encoder+decoder site
            else:
                specs = (_stack_spec(graph, site, False),)
            q, k = graph.find(role="attn.q", stack=stack)[0], graph.find(role="attn.k", stack=stack)[0]
            up = graph.find(role=("ffn.up", "ffn.gate"), stack=stack)[0]
            sites.append(site.with_extra(heads=graph.num_heads(stack) or 1, inner=q.out_features,
                                         kv_inner=k.out_features, ffn=up.out_features, stacks=specs,
                                         layers=max(spec.layers for spec in specs), rotary=rotary,
                                         causal=stack == "decoder" and not decoders))
        return sites

    def dims(self, site: Site) -> dict[str, Dim]:
        head_dim = site.get("inner") // site.get("heads")
        high = max(1, min(32, head_dim))
        return {
            "reduction": IntDim("reduction", default=min(8, high), low=1, high=high, log=True,
                                help="side width = backbone width / r (the paper uses 8)"),
            "keep_every": IntDim("keep_every", default=1, low=1, high=max(1, site.get("layers")),
                                 help="layer dropping: ladders from every k-th layer, counted from the top"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        widths = side_widths(site, cfg["reduction"])
        h, hs = site.in_features, widths["hidden"]
        total = hs * h + h  # the up-projection
        for spec in site.get("stacks"):
            kept = kept_layers(spec.layers, cfg["keep_every"])
            total += sum(pruned_numel(role, name, shape, widths) for i in kept for role, name, shape in spec.params[i])
            total += (len(kept) + 1) * (h * hs + hs) + len(kept)  # downs (first too) and gates
            total += len(spec.norm_params) * hs  # the side encoder's final norm
        return total

    def build(self, site: Site, cfg: dict[str, Any]) -> LadderSide:
        return LadderSide(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        """Side blocks with trainable weights at width / r; each ladder keeps the backbone state it
        reads (width h) and the difference it mixes; a side encoder's final norm its input and
        statistics; the up-projection keeps its input."""
        widths = side_widths(site, cfg["reduction"])
        hs, tokens = widths["hidden"], shape.tokens
        total = float(tokens * hs)
        for spec in site.get("stacks"):
            kept = kept_layers(spec.layers, cfg["keep_every"])
            if spec.profile is not None:
                profile = spec.profile.scaled(cfg["reduction"])
                total += len(kept) * profile.elements(tokens, shape.seq, trainable=True)
                if spec.norm_path is not None:
                    total += tokens * (hs + profile.norm_stats)
            total += tokens * (len(kept) + 1) * site.in_features + tokens * len(kept) * hs
        return int(total)
