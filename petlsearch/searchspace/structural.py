"""Roles from structure: the attention's q, k, v (or a fused qkv) and o, and the FFN's up, gate
and down, found from the shapes and order of a block's Linear layers where the name rules of
`roles.py` know no name for them (DeBERTa-v2's `query_proj`, Funnel's `q_head`, HuBERT's
`intermediate_dense`, Phi-3's fused `gate_up_proj`, or a model of one's own).

In a block of hidden width H, with the FFN's inner width I:

- the FFN's down projection reads I > H and writes H; its up projection reads H and writes I (a
  fused gate-and-up writes 2I); of two H -> I layers the first is the gate (Llama's, T5's order);
- the other layers that read H are the attention's inputs, grouped by the module that holds them:
  three are q, k and v (q the widest, else in registration order, the order of every family
  we know; a name that says query / key / value decides), one is a fused qkv;
- the attention's o writes H from q's width: the one in the same module, else the next one after
  the inputs (BERT's `attention.output.dense`). A second attention group in a block is the cross
  attention.

Only layers the name rules left without a role get one here, and only roles the block does not
have yet; each is marked (`Node.role_from == "structure"`), and `petlsearch graph` says which.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from petlsearch.searchspace.graph import Block, Node

log = logging.getLogger(__name__)
FROM_STRUCTURE = "structure"
_WORDS = re.compile(r"[a-z]+")
_HINTS = {"q": {"q", "query"}, "k": {"k", "key"}, "v": {"v", "value"}}
_OUT_HINTS = {"o", "out", "output", "post", "dense"}
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder", re.IGNORECASE)


def fill_roles(nodes: dict[str, Node], blocks: Sequence[Block], linear_types: set[str]) -> list[str]:
    """Give roles to the unnamed Linear layers of each block; the paths that got one."""
    found: list[str] = []
    for block in blocks:
        inside = [n for n in nodes.values() if n.path.startswith(block.path + ".") and n.type in linear_types
                  and n.in_features and n.out_features]
        if any(n.role is None for n in inside):
            found += _fill_block(inside)
    if found:
        log.info("roles from structure for %d Linear modules, e.g. %s", len(found), found[:3])
    return found


def _fill_block(linears: list[Node]) -> list[str]:
    hidden = Counter(n.in_features for n in linears).most_common(1)[0][0]
    roles: dict[str, str] = {}  # path -> role, for the layers without one
    used = _ffn_roles(linears, hidden, roles)
    groups: dict[str, list[Node]] = {}
    for n in linears:
        if n.in_features == hidden and n.path not in used:
            groups.setdefault(_parent(n.path), []).append(n)
    attentions = 0
    for holder, group in groups.items():
        inputs, writer = _split_attention(group, hidden)
        if not inputs or attentions == 2:
            continue
        prefix = "xattn" if attentions or _CROSS.search(holder.rsplit(".", 1)[-1]) else "attn"
        attentions += 1
        width = _assign_inputs(inputs, prefix, roles)
        writer = writer or _writer(linears, holder, inputs, width, hidden, used | set(roles))
        if writer is not None:
            roles[writer.path] = f"{prefix}.o"
    taken = {n.role for n in linears if n.role is not None}
    out = []
    for n in linears:
        role = roles.get(n.path)
        if n.role is None and role is not None and role not in taken and not _clashes(role, taken):
            n.role, n.role_from = role, FROM_STRUCTURE
            taken.add(role)
            out.append(n.path)
    return out


def _ffn_roles(linears: list[Node], hidden: int, roles: dict[str, str]) -> set[str]:
    """down (inner -> hidden, the last such), up and gate (hidden -> inner beside it); their paths."""
    downs = [n for n in linears if n.out_features == hidden and n.in_features > hidden]
    if not downs:
        return set()
    down, inner = downs[-1], downs[-1].in_features
    readers = Counter(_parent(n.path) for n in linears if n.in_features == hidden)
    # beside the down projection, or alone in a module of its own (BERT's intermediate.dense)
    ups = [n for n in linears if n.in_features == hidden and n.out_features in (inner, 2 * inner)
           and (_parent(n.path) == _parent(down.path) or readers[_parent(n.path)] == 1)]
    roles[down.path] = "ffn.down"
    fused = [n for n in ups if n.out_features == 2 * inner]
    plain = [n for n in ups if n.out_features == inner]
    if fused and not plain:
        roles[fused[0].path] = "ffn.up"
    elif len(plain) >= 2:
        gate = next((n for n in plain if "gate" in _words(n)), plain[0])
        roles[gate.path] = "ffn.gate"
        roles[next(n.path for n in plain if n is not gate)] = "ffn.up"
    elif plain:
        roles[plain[0].path] = "ffn.up"
    return {down.path, *(n.path for n in ups)}


def _split_attention(group: list[Node], hidden: int) -> tuple[list[Node], Node | None]:
    """(inputs, output) of the layers of one module that read the hidden states: four are q, k, v
    and o; three q, k and v (o sits elsewhere); two a fused qkv and o; one a fused qkv."""
    if len(group) == 4:
        writer = next((n for n in group if _words(n) & _OUT_HINTS), group[-1])
        return [n for n in group if n is not writer], writer
    if len(group) == 3:
        return group, None
    if len(group) == 2:
        fused, other = sorted(group, key=lambda n: -n.out_features)
        return ([fused], other if other.out_features == hidden else None) if fused.out_features > hidden else ([], None)
    if len(group) == 1 and group[0].out_features > hidden:
        return group, None
    return [], None


def _assign_inputs(group: list[Node], prefix: str, roles: dict[str, str]) -> int:
    """q, k, v (or qkv) of one attention group; returns q's width (what o reads)."""
    if len(group) == 1:
        roles[group[0].path] = f"{prefix}.qkv"
        return group[0].out_features // 3 if group[0].out_features % 3 == 0 else group[0].in_features
    named = {key: next((n for n in group if _words(n) & hints), None) for key, hints in _HINTS.items()}
    if all(named.values()) and len({id(n) for n in named.values()}) == 3:
        order = [named["q"], named["k"], named["v"]]
    else:
        widest = max(group, key=lambda n: n.out_features)
        rest = [n for n in group if n is not widest]
        order = [widest, *rest] if widest.out_features > rest[0].out_features else group
    for key, n in zip("qkv", order):
        roles[n.path] = f"{prefix}.{key}"
    return order[0].out_features


def _writer(linears: list[Node], holder: str, group: list[Node], width: int, hidden: int,
            used: set[str]) -> Node | None:
    """The attention's output projection: width -> hidden, in the inputs' module, else the first
    such layer after them."""
    fits = [n for n in linears if n.in_features == width and n.out_features == hidden and n.path not in used
            and n not in group]
    same = [n for n in fits if _parent(n.path) == holder]
    if same:
        return same[0]
    last = max(linears.index(n) for n in group)
    return next((n for n in fits if linears.index(n) > last), None)


def _clashes(role: str, taken: set[str]) -> bool:
    """A fused qkv beside named q/k/v, or q beside a named qkv: the block has its inputs already."""
    prefix, _, what = role.partition(".")
    if what == "qkv":
        return any(f"{prefix}.{k}" in taken for k in "qkv")
    return what in "qkv" and f"{prefix}.qkv" in taken


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def _words(node: Node) -> set[str]:
    return set(_WORDS.findall(node.path.rsplit(".", 1)[-1].lower()))
