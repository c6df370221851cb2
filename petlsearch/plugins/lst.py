"""LST: a ladder side network beside a frozen backbone (Sung et al., LST: Ladder Side-Tuning for
Parameter and Memory Efficient Transfer Learning, NeurIPS 2022).

A side network of 1/r of the backbone's width has one block per kept backbone layer. Ladders feed
it: after kept layer i, side <- mu_i * side + (1 - mu_i) * down_i(h_i), with mu_i = sigmoid(alpha_i / T),
T = 0.1, and side <- side_block_i(side); the first side state is down_0(embeddings). Layer dropping
keeps every k-th layer counted from the top (`keep_every`). Side blocks start as the backbone's own
blocks pruned to the side width by weight magnitude (the paper's structured "network pruning"
init: the hidden, per-head and FFN dimensions with the largest L1 norms). The backbone runs without
gradient, so backward never crosses it: that is where the memory saving comes from. The final side
state is up-projected and added to the last block's output (before the stack's final norm, which
then normalises both); the up-projection starts at zero, so a fresh module changes nothing.

Sites: one per stack (`stack_sites`) whose blocks have separate q/k/v projections, no
cross-attention and no rotary embedding (BERT, ViT, the T5 encoder, CLIP's towers). While it is
installed, other placements inside that stack get no gradient.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from petlsearch.plugins.base import BatchShape, PETLModule, Plugin, Site
from petlsearch.plugins.dims import Dim, IntDim
from petlsearch.searchspace.roles import block_role
from petlsearch.searchspace.sites import stack_sites

TEMPERATURE = 0.1  # mu = sigmoid(alpha / T), as the paper
# (output dimension, input dimension) of each role, in terms of the widths that shrink
ROLE_DIMS: dict[str, tuple[str, str | None]] = {
    "attn.q": ("inner", "hidden"), "attn.k": ("inner", "hidden"), "attn.v": ("inner", "hidden"),
    "attn.o": ("hidden", "inner"), "ffn.up": ("ffn", "hidden"), "ffn.gate": ("ffn", "hidden"),
    "ffn.down": ("hidden", "ffn"), "norm": ("hidden", None),
}


def side_widths(site: Site, reduction: int) -> dict[str, int]:
    """Widths of the side network: hidden / r, FFN / r, the same heads with head_dim / r."""
    heads, head_dim = site.get("heads"), site.get("inner") // site.get("heads")
    return {"hidden": max(1, site.in_features // reduction), "ffn": max(1, site.get("ffn") // reduction),
            "inner": heads * max(1, head_dim // reduction), "head_dim": max(1, head_dim // reduction)}


def kept_layers(layers: int, every: int) -> list[int]:
    """Every `every`-th layer counted down from the last, which is always kept."""
    return [i for i in range(layers) if (layers - 1 - i) % every == 0]


def pruned_numel(role: str, param: str, shape: tuple[int, ...], widths: dict[str, int]) -> int:
    dims = ROLE_DIMS.get(role)
    if dims is None:  # e.g. T5's relative position bias (buckets x heads): heads are kept
        return math.prod(shape)
    out = widths[dims[0]]
    return out * widths[dims[1]] if param == "weight" and dims[1] else out


class LadderSide(PETLModule):
    """The side network of one stack, its ladders and its up-projection."""

    def __init__(self, site: Site, cfg: dict[str, Any]) -> None:
        super().__init__(site)
        self.widths = side_widths(site, cfg["reduction"])
        self.kept = kept_layers(site.get("layers"), cfg["keep_every"])
        h, hs = site.in_features, self.widths["hidden"]
        self.down_first = nn.Linear(h, hs)  # embeddings -> first side state
        self.downs = nn.ModuleList(nn.Linear(h, hs) for _ in self.kept)  # the ladders
        self.alphas = nn.Parameter(torch.zeros(len(self.kept)))  # mu starts at 0.5
        self.up = nn.Linear(hs, h)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.blocks = nn.ModuleList()  # pruned copies of the kept backbone blocks, made at install
        self._side: torch.Tensor | None = None
        self._grad: list[bool] = []

    # ------------------------------------------------------------------ install
    def install(self, model: nn.Module) -> None:
        parent_path = self.site.path.rsplit(".", 1)[0] if "." in self.site.path else ""
        host = model.get_submodule(parent_path)  # not the block list: it would iterate over us
        blocks = list(model.get_submodule(self.site.path))
        if not len(self.blocks):
            reference = next(self.parameters())
            for i in self.kept:
                side = prune_block(blocks[i], self.widths).to(device=reference.device, dtype=reference.dtype)
                self.blocks.append(side.train(self.training))
        host.add_module(self.child_name, self)
        self._hosts.append(host)
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(  # always: restore grad mode on errors too
                self._post(i, last=i == len(blocks) - 1), with_kwargs=True, always_call=True))

    def _pre(self, i: int) -> Any:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._grad.append(torch.is_grad_enabled())
            if self.gate_off:
                return
            if i == 0:
                x = args[0] if args else kwargs["hidden_states"]
                self._side = self.down_first(x.detach())
            torch.set_grad_enabled(False)  # the backbone keeps nothing for backward
        return hook

    def _post(self, i: int, last: bool) -> Any:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            torch.set_grad_enabled(self._grad.pop() if self._grad else True)
            if self.gate_off or self._side is None or out is None:
                return None
            if i in self.kept:
                k = self.kept.index(i)
                mu = torch.sigmoid(self.alphas[k] / TEMPERATURE)
                x = mu * self._side + (1 - mu) * self.downs[k](_first(out).detach())
                side_args = (x, *args[1:]) if args else ()
                side_kwargs = kwargs if args else {**kwargs, "hidden_states": x}
                self._side = _first(self.blocks[k](*side_args, **side_kwargs))
            if not last:
                return None
            side, self._side = self._side, None
            hidden = _first(out) + self.gated(self.up(side))
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
        return hook


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------- pruning
def _importance(linears: dict[str, list[nn.Module]], norms: list[nn.Module]) -> dict[str, torch.Tensor]:
    """L1 norm of the weights that touch each hidden, attention-inner and FFN unit."""
    score: dict[str, torch.Tensor] = {}

    def add(kind: str, values: torch.Tensor) -> None:
        score[kind] = score.get(kind, 0) + values.detach().float().abs()

    for role, modules in linears.items():
        out_kind, in_kind = ROLE_DIMS[role]
        for m in modules:
            add(out_kind, m.weight.abs().sum(1))
            add(in_kind, m.weight.abs().sum(0))
    for m in norms:
        add("hidden", m.weight)
    return score


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


def _keep(score: dict[str, torch.Tensor], widths: dict[str, int], heads: int) -> dict[str, torch.Tensor]:
    """Indices kept per dimension; the attention keeps every head, each cut to head_dim / r."""
    inner = score["inner"].view(heads, -1)
    per_head = [h * inner.shape[1] + _top(inner[h], widths["head_dim"]) for h in range(heads)]
    return {"hidden": _top(score["hidden"], widths["hidden"]), "ffn": _top(score["ffn"], widths["ffn"]),
            "inner": torch.cat(per_head)}


def prune_block(block: nn.Module, widths: dict[str, int]) -> nn.Module:
    """A trainable copy of `block` cut to `widths` by weight magnitude (structured pruning)."""
    side = copy.deepcopy(block)
    _strip(side)
    roles = {name: block_role(name, type(m).__name__) for name, m in side.named_modules() if name}
    linears: dict[str, list[nn.Module]] = {}
    norms = []
    for name, m in side.named_modules():
        role = roles.get(name)
        if role == "norm":
            norms.append(m)
        elif role in ROLE_DIMS:
            linears.setdefault(role, []).append(m)
    old = {"hidden": linears["attn.q"][0].in_features, "inner": linears["attn.q"][0].out_features}
    heads = old["inner"] // _head_dim(side, old["inner"])
    keep = _keep(_importance(linears, norms), widths, heads)
    for role, modules in linears.items():
        out_kind, in_kind = ROLE_DIMS[role]
        for m in modules:
            _slice(m, keep[out_kind], keep[in_kind])
    for m in norms:
        _slice(m, keep["hidden"], None)
    _fix_sizes(side, old, widths, heads)
    for p in side.parameters():
        p.requires_grad_(True)
    return side


def _head_dim(block: nn.Module, inner: int) -> int:
    for m in block.modules():
        for attr in ("attention_head_size", "head_dim", "key_value_proj_dim"):
            value = getattr(m, attr, None)
            if isinstance(value, int) and value > 0 and inner % value == 0:
                return value
    raise ValueError(f"lst: cannot find the head size of {type(block).__name__}")


def _slice(m: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    with torch.no_grad():
        w = m.weight[out_idx] if in_idx is None else m.weight[out_idx][:, in_idx]
        m.weight = nn.Parameter(w.clone())
        if getattr(m, "bias", None) is not None:
            m.bias = nn.Parameter(m.bias[out_idx].clone())
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(out_idx.numel()), int(in_idx.numel())
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (int(out_idx.numel()),)


def _fix_sizes(block: nn.Module, old: dict[str, int], widths: dict[str, int], heads: int) -> None:
    """Size attributes the attention modules read in forward (head size, inner size, scaling)."""
    old_head = old["inner"] // heads
    for m in block.modules():
        for attr in ("attention_head_size", "head_dim", "key_value_proj_dim", "d_kv"):
            if getattr(m, attr, None) == old_head:
                setattr(m, attr, widths["head_dim"])
        for attr in ("all_head_size", "inner_dim"):
            if getattr(m, attr, None) == old["inner"]:
                setattr(m, attr, widths["inner"])
        for attr in ("embed_dim", "d_model", "hidden_size"):
            if getattr(m, attr, None) == old["hidden"]:
                setattr(m, attr, widths["hidden"])
        for attr in ("scaling", "scale"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and math.isclose(value, old_head ** -0.5):
                setattr(m, attr, widths["head_dim"] ** -0.5)


def _strip(block: nn.Module) -> None:
    """Remove other plugins' modules, hooks and parametrizations from a copied block."""
    from torch.nn.utils import parametrize

    for m in list(block.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, PETLModule):
                delattr(m, name)
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        for name in list(getattr(m, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(m, name, leave_parametrized=False)


# ---------------------------------------------------------------------- the plugin
def _supported(graph: Any, stack: str) -> bool:
    nodes = [n for n in graph.nodes.values() if n.stack == stack and n.layer is not None]
    linear_roles = {n.role for n in nodes if n.type == "Linear"}
    return ("attn.q" in linear_roles and linear_roles <= set(ROLE_DIMS)
            and not any("Rotary" in n.type for n in graph.nodes.values()))


class LadderSideTuning(Plugin):
    name = "lst"
    description = "Ladder side network of reduced width fed by the frozen backbone's hidden states"
    paper = "Sung et al., LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, NeurIPS 2022"
    kinds = ("side",)

    def sites(self, graph: Any) -> list[Site]:
        from petlsearch.searchspace.memory import block_profile

        sites = []
        for site in stack_sites(graph, "side"):
            if not _supported(graph, site.stack):
                continue
            q = graph.find(role="attn.q", stack=site.stack)[0]
            up = graph.find(role=("ffn.up", "ffn.gate"), stack=site.stack)[0]
            params = tuple(
                tuple((n.role or "", name, shape) for n in graph.nodes.values()
                      if n.path.startswith(b.path + ".") for name, shape in n.params.items())
                for b in graph.blocks if b.stack == site.stack)
            sites.append(site.with_extra(heads=graph.num_heads(site.stack) or 1, inner=q.out_features,
                                         ffn=up.out_features, params=params,
                                         profile=block_profile(graph, site.stack)))
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
        kept = kept_layers(site.get("layers"), cfg["keep_every"])
        h, hs = site.in_features, widths["hidden"]
        blocks = sum(pruned_numel(role, name, shape, widths)
                     for i in kept for role, name, shape in site.get("params")[i])
        ladders = (len(kept) + 1) * (h * hs + hs) + len(kept)  # downs (first too) and gates
        return blocks + ladders + hs * h + h  # + up-projection

    def build(self, site: Site, cfg: dict[str, Any]) -> LadderSide:
        return LadderSide(site, cfg)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        """Side blocks with trainable weights at width / r; each ladder keeps the backbone state it
        reads (width h) and its two mixed terms; the up-projection keeps its input."""
        from petlsearch.searchspace.memory import BlockProfile

        profile: BlockProfile | None = site.get("profile")
        widths = side_widths(site, cfg["reduction"])
        kept = kept_layers(site.get("layers"), cfg["keep_every"])
        hs, tokens = widths["hidden"], shape.tokens
        blocks = 0.0
        if profile is not None:
            blocks = len(kept) * profile.scaled(cfg["reduction"]).elements(tokens, shape.seq, trainable=True)
        ladders = tokens * (len(kept) + 1) * site.in_features + tokens * len(kept) * 2 * hs
        return int(blocks + ladders + tokens * hs)
