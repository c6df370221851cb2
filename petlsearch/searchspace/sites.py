"""Sites, the places in a model a method can act on (`Site`, of one of SITE_KINDS), and the factories
that turn a ModelGraph into them.

A plugin's `sites(graph)` is usually one call here, so that every method names the same places
the same way (`encoder.L3.attn.q:weight`, `encoder.L3.ffn:sequential`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petlsearch.searchspace.graph import ModelGraph, Node

ATTN_PROJECTIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
                    "xattn.q", "xattn.k", "xattn.v", "xattn.o")
FFN_PROJECTIONS = ("ffn.up", "ffn.gate", "ffn.down")
PROJECTIONS = ATTN_PROJECTIONS + FFN_PROJECTIONS
SUBLAYERS = ("attn", "xattn", "ffn")
SITE_KINDS = ("weight", "sequential", "parallel", "scale", "tokens", "kv_prefix", "query", "side", "head")


@dataclass(frozen=True)
class Site:
    """A place in the model a method can act on.

    `name` is backbone-independent (`encoder.L3.attn.q`); `path` is the module it hooks into;
    `source` is the module whose input feeds a parallel branch; `param` the parameter a weight
    site changes; `extra` holds kind-specific facts (heads, head_dim, where) as sorted pairs.
    """

    name: str
    kind: str
    path: str
    role: str
    stack: str
    layer: int | None = None
    in_features: int | None = None
    out_features: int | None = None
    source: str | None = None
    param: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """Unique within a model: the name and the kind (LoRA and an adapter may share a name)."""
        return f"{self.name}:{self.kind}"

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)

    def with_extra(self, **extra: Any) -> Site:
        return replace(self, extra=tuple(sorted({**dict(self.extra), **extra}.items())))


def _site(node: Node, kind: str, **kw: Any) -> Site:
    extra = tuple(sorted(kw.pop("extra", {}).items()))
    fields = {"in_features": node.in_features, "out_features": node.out_features, **kw}
    return Site(name=node.name, kind=kind, path=node.path, role=node.role or "", stack=node.stack or "",
                layer=node.layer, extra=extra, **fields)


def node_sites(graph: ModelGraph, kind: str, roles: tuple[str, ...] = PROJECTIONS,
               param: str | None = None, **extra: Any) -> list[Site]:
    """One site per node whose role is in `roles` (and, with `param`, that has that parameter)."""
    return [
        _site(n, kind, param=param, extra=dict(extra))
        for n in graph.find(role=roles)
        if param is None or param in n.params
    ]


def sublayer_sites(graph: ModelGraph, kind: str, sublayers: tuple[str, ...] = SUBLAYERS) -> list[Site]:
    """One site per attention / FFN sublayer: the target is its last projection (attn.o, ffn.down),
    the source is the module that first reads the sublayer's input (q / qkv, or ffn.up / gate)."""
    sites = []
    for block in graph.blocks:
        for sub in sublayers:
            out_role = f"{sub}.o" if sub != "ffn" else "ffn.down"
            in_roles = (f"{sub}.q", f"{sub}.qkv") if sub != "ffn" else ("ffn.gate", "ffn.up")
            outs = graph.find(role=out_role, stack=block.stack, layer=block.layer)
            ins = [n for r in in_roles for n in graph.find(role=r, stack=block.stack, layer=block.layer)]
            if not outs or not ins:
                continue
            out, src = outs[0], ins[0]
            name = f"{block.stack}.L{block.layer}.{sub}"
            sites.append(Site(name=name, kind=kind, path=out.path, role=sub, stack=block.stack,
                              layer=block.layer, in_features=src.in_features, out_features=out.out_features,
                              source=src.path))
    return sites


def block_sites(graph: ModelGraph, kind: str, **extra: Any) -> list[Site]:
    """One site per block (layer): for tokens inserted at a layer's input or query tokens."""
    sites = []
    for block in graph.blocks:
        hidden = graph.hidden_size(block.stack)
        sites.append(Site(name=f"{block.stack}.L{block.layer}", kind=kind, path=block.path, role="block",
                          stack=block.stack, layer=block.layer, in_features=hidden, out_features=hidden,
                          extra=tuple(sorted(extra.items()))))
    return sites


def attention_sites(graph: ModelGraph, kind: str, roles: tuple[str, ...] = ("attn", "xattn")) -> list[Site]:
    """One site per attention module (where attention is computed), with heads and head_dim; for
    kv_prefix only those that dispatch through transformers' AttentionInterface."""
    sites = []
    prefixable = graph.info.get("prefixable")
    for n in graph.find(role=roles):
        if kind == "kv_prefix" and prefixable is not None and n.type not in prefixable:
            continue  # its forward computes attention itself: no way to add keys without editing it
        heads = graph.num_heads(n.stack or "") or 1
        hidden = graph.hidden_size(n.stack or "") or 0
        kv = graph.find(role=f"{n.role}.k", stack=n.stack, layer=n.layer)
        kv_out = kv[0].out_features if kv else hidden
        head_dim = hidden // heads if heads else hidden
        kv_heads = max(1, (kv_out or hidden) // max(head_dim, 1))
        sites.append(_site(n, kind, in_features=hidden, out_features=hidden,
                           extra={"heads": heads, "head_dim": head_dim, "kv_heads": kv_heads}))
    return sites


def stack_sites(graph: ModelGraph, kind: str) -> list[Site]:
    """One site per sequence stack (encoder, decoder, vision, text): for side networks."""
    sites = []
    for stack in graph.stacks:
        blocks = [b for b in graph.blocks if b.stack == stack]
        list_path = blocks[0].path.rsplit(".", 1)[0]
        hidden = graph.hidden_size(stack)
        sites.append(Site(name=stack, kind=kind, path=list_path, role="stack", stack=stack, layer=None,
                          in_features=hidden, out_features=hidden, extra=(("layers", len(blocks)),)))
    return sites


def head_sites(graph: ModelGraph, kind: str = "head") -> list[Site]:
    """The task head(s): for methods that work on pooled output features."""
    return [_site(n, kind) for n in graph.find(role="head")]
