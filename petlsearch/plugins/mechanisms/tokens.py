"""The `tokens` site kind: learnable tokens inserted into a transformer's sequence.

Shared by prompt tuning, ATTEMPT (tokens at the input, before position embeddings) and VPT (tokens
at the input of chosen blocks, after the first token). One coordinator per stack, `TokenSlots`,
owns every hook, so that several token modules on one stack agree on where the extra positions are:

- `input` level: a forward pre-hook on the stack's owner (BertModel, GPT2Model, T5 encoder stack,
  LlamaModel) turns `input_ids` into `inputs_embeds` with the frozen word-embedding table, prepends
  the tokens, and extends `attention_mask` (ones), `token_type_ids` (zeros) and `position_ids`
  (prompts take the first positions), exactly as Hugging Face peft's prompt tuning does.
- `block` level: a forward pre-hook on each block inserts the tokens after the first token ([CLS])
  at that block's input, or replaces the token positions already there (deep VPT); the 4-D mask the
  block receives, built by the owner for the shorter sequence, is widened to match.
- The owner's output drops the inserted positions from `last_hidden_state` / `hidden_states`, so
  the caller sees its own sequence length (pooled outputs computed inside the owner saw them), except
  for an encoder read by a cross-attending decoder (T5): there the decoder's `encoder_attention_mask`
  is extended instead, so the decoder attends to the prompts as in Lester et al.

Gate: a module whose gate is 0 (a float or a 0-dim tensor) is skipped entirely, so the model is
exactly as without it; otherwise it inserts gate * tokens, or moves the positions it replaces by
gate * (tokens - old). Incremental decoding with a non-empty KV cache is refused (see `cached_length`).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.mechanisms.hooks import PETLModule, cached_length
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.sites import Site

if TYPE_CHECKING:
    from petlsearch.searchspace.graph import ModelGraph, Node

_POSITIONAL = re.compile(r"pos|wpe|token_type|segment", re.IGNORECASE)
# relative-position bias tables (MPNet's encoder-level relative_attention_bias, heads wide): neither
# the word embedding nor an absolute position table that bounds the length
_RELATIVE = re.compile(r"relative|attention_bias", re.IGNORECASE)
_ATTR = "_petl_token_slots"


# ---------------------------------------------------------------------------------- graph queries
def _common_prefix(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _word_embedding(graph: ModelGraph, stack: str, list_path: str) -> Node | None:
    """The token-embedding table of a stack: an `embed` Embedding that is not positional, the one
    closest to the blocks (T5's encoder.embed_tokens rather than the root's shared table)."""
    tables = [n for n in graph.find(role="embed", stack=stack, type="Embedding")
              if not _POSITIONAL.search(n.path.rsplit(".", 1)[-1]) and not _RELATIVE.search(n.path)]

    def depth(n: Node) -> tuple[int, int]:
        common = _common_prefix(n.path, list_path)
        return (common.count(".") + 1 if common else 0, n.in_features or 0)
    return max(tables, key=depth) if tables else None


def _container(graph: ModelGraph, stack: str) -> Node | None:
    """The embeddings module (BertEmbeddings, ViTEmbeddings): an `embed` node that is not a table."""
    return next((n for n in graph.find(role="embed", stack=stack)
                 if n.type != "Embedding" and (graph.parent(n.path) is None or graph.parent(n.path).role != "embed")),
                None)


def stack_layout(graph: ModelGraph, stack: str) -> dict[str, Any] | None:
    """Where a stack's tokens go: the owner module to hook, its word embedding, the block list, and
    how the stack's output is read. None for stacks that cannot take tokens: a cross-attending
    decoder (prompts belong to its encoder) and the text tower of a dual encoder (CLIP pools at the
    EOS index of input_ids, which prepended tokens would shift)."""
    blocks = [b for b in graph.blocks if b.stack == stack]
    if not blocks or graph.find(role="xattn", stack=stack):
        return None
    if stack == "text" and "vision" in graph.stacks:
        return None
    list_path = blocks[0].path.rsplit(".", 1)[0]
    word, box = _word_embedding(graph, stack, list_path), _container(graph, stack)
    anchor = box or word
    if anchor is None:
        return None
    decoders = [b for b in graph.blocks if b.stack != stack and graph.find(role="xattn", stack=b.stack)]
    tables = [n.in_features for n in graph.find(role="embed", stack=stack, type="Embedding")
              if _POSITIONAL.search(n.path.rsplit(".", 1)[-1]) and "token_type" not in n.path
              and not _RELATIVE.search(n.path)]
    conv = next((n for n in graph.find(role="conv", stack=stack)
                 if box and n.path.startswith(box.path + ".") and len(n.params.get("weight", ())) == 4), None)
    fan_in = None
    if conv is not None:
        _, c, kh, kw = conv.params["weight"]
        fan_in = c * kh * kw
    return {
        "owner": _common_prefix(anchor.path, list_path),
        "embed": word.path if word is not None else None,
        "blocks": list_path,
        "cls": 1 if box is not None else 0,
        "keep": bool(decoders),
        "consumer": decoders[0].path.rsplit(".", 2)[0] if decoders else None,
        "max_positions": min(tables) if tables else None,  # absolute position tables bound the length
        "patch_fan_in": fan_in,
        "layers": len(blocks),
    }


def input_sites(graph: ModelGraph) -> list[Site]:
    """One `tokens` site per text stack, at its input (prompt tuning, ATTEMPT)."""
    sites = []
    for stack in graph.stacks:
        layout = stack_layout(graph, stack)
        if layout is None or layout["embed"] is None:
            continue
        hidden = graph.hidden_size(stack) or graph.node(layout["embed"]).out_features
        sites.append(Site(name=f"{stack}.input", kind="tokens", path=layout["owner"], role="embed", stack=stack,
                          in_features=hidden, out_features=hidden, extra=tuple(sorted(layout.items()))))
    return sites


def layer_sites(graph: ModelGraph) -> list[Site]:
    """One `tokens` site per block of the stacks that have an embeddings module (VPT)."""
    from petlsearch.searchspace.sites import block_sites

    layouts = {s: stack_layout(graph, s) for s in graph.stacks}
    return [site.with_extra(**layouts[site.stack]) for site in block_sites(graph, "tokens")
            if layouts.get(site.stack) and layouts[site.stack]["cls"]]


def token_activations(site: Site, n: int, shape: BatchShape) -> int:
    """The inserted tokens themselves; what the longer sequence costs the blocks downstream the
    memory model adds from `added_tokens`."""
    return shape.batch * n * (site.in_features or 0)


# ---------------------------------------------------------------------------------- modules
class TokenModule(PETLModule):
    """Base of the token modules: `tokens()` gives (n, H) or (B, n, H); `level` says where they go."""

    level: ClassVar[str] = "input"  # "input": prepended at the stack input; "block": at a block's input

    def tokens(self, embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """The tokens to insert, ungated; `embeds` / `mask` are the input's word embeddings and 2-D
        mask (input level only; None at block level)."""
        raise NotImplementedError

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        self._slots = TokenSlots.of(model, self.site)
        self._slots.add(self)

    def uninstall(self) -> None:
        slots = self.__dict__.pop("_slots", None)
        if slots is not None:
            slots.discard(self)
        super().uninstall()

    def batch_tokens(self, like: torch.Tensor, embeds: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        toks = self.tokens(embeds, mask).to(like.dtype)
        return toks.expand(like.shape[0], *toks.shape[-2:]) if toks.dim() == 2 else toks  # (B, n, H)


class TokenSlots:
    """The per-stack coordinator: hooks on the owner and the blocks, shared by every token module."""

    def __init__(self, model: nn.Module, site: Site) -> None:
        self.owner = model.get_submodule(site.get("owner"))
        embed = site.get("embed")
        self.embed = model.get_submodule(embed) if embed else None
        self.cls, self.keep = site.get("cls", 0), site.get("keep", False)
        self.inputs: list[TokenModule] = []
        self.layers: dict[int, list[TokenModule]] = {}
        self.n_in = self.n_blk = 0  # positions inserted in the current forward
        self.length: int | None = None  # the caller's sequence length in the current forward
        self._owner_sig = inspect.signature(self.owner.forward)
        self.handles = [self.owner.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.owner.register_forward_hook(self._after)]
        # hooks are bound methods and partials (no closures), so a deep copy of the model stays wired
        blocks = list(model.get_submodule(site.get("blocks")))
        self._block_sigs = [inspect.signature(b.forward) for b in blocks]
        self.handles += [b.register_forward_pre_hook(functools.partial(self._at_block, i), with_kwargs=True)
                         for i, b in enumerate(blocks)]
        if self.keep and site.get("consumer") is not None:
            consumer = model.get_submodule(site.get("consumer"))
            self._consumer_sig = inspect.signature(consumer.forward)
            self.handles.append(consumer.register_forward_pre_hook(self._extend_encoder_mask, with_kwargs=True))

    @classmethod
    def of(cls, model: nn.Module, site: Site) -> TokenSlots:
        owner = model.get_submodule(site.get("owner"))
        slots = owner.__dict__.get(_ATTR)
        if slots is None:
            slots = cls(model, site)
            owner.__dict__[_ATTR] = slots
        return slots

    def add(self, module: TokenModule) -> None:
        if module.level == "input":
            if self.embed is None:
                raise PluginError(f"site '{module.site.key}': input-level tokens need a word-embedding table")
            self.inputs.append(module)
        else:
            self.layers.setdefault(module.site.layer or 0, []).append(module)

    def discard(self, module: TokenModule) -> None:
        for group in (self.inputs, *self.layers.values()):
            if module in group:
                group.remove(module)
        if not self.inputs and not any(self.layers.values()):
            for handle in self.handles:
                handle.remove()
            self.owner.__dict__.pop(_ATTR, None)

    # ------------------------------------------------------------------ hooks
    def _before(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self.n_in = self.n_blk = 0
        self.length = None
        active = [m for m in self.inputs if not m.gate_off]
        active_any = active or any(not m.gate_off for ms in self.layers.values() for m in ms)
        a = Call(self._owner_sig, args, kwargs)
        if active_any and cached_length(a) > 0:
            raise PluginError("token modules (prompt tuning, VPT, ATTEMPT) do not support decoding with a "
                              "non-empty KV cache; call the model on the whole sequence (use_cache=False)")
        if not active:
            return None
        embeds = a.get("inputs_embeds")
        if embeds is None:
            embeds = self.embed(a["input_ids"])  # (B, T, H)
        mask = a.get("attention_mask")
        toks = torch.cat([m.gated(m.batch_tokens(embeds, embeds, mask)) for m in active], dim=1)  # (B, n, H)
        n, batch = toks.shape[1], embeds.shape[0]
        a["input_ids"], a["inputs_embeds"] = None, torch.cat([toks, embeds], dim=1)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            a["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if a.get("token_type_ids") is not None:
            a["token_type_ids"] = torch.cat([a["token_type_ids"].new_zeros(batch, n), a["token_type_ids"]], dim=1)
        if a.get("position_ids") is not None:
            pos = a["position_ids"]
            first = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            a["position_ids"] = torch.cat([first, pos + n], dim=-1)
        self.n_in, self.length = n, embeds.shape[1]
        return a.result()

    def _at_block(self, layer: int, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        active = [m for m in self.layers.get(layer, []) if not m.gate_off]
        if not active and not self.n_blk:
            return None
        sig = self._block_sigs[layer]
        a = Call(sig, args, kwargs)
        name = next(iter(sig.parameters))
        h = a[name]  # (B, L, H)
        if self.length is None:
            self.length = h.shape[1] - self.n_in - self.n_blk
        for m in active:
            h = self._place(h, m)
        a[name] = h
        base = self.n_in + self.length
        # a 4-d mask, and a relative position bias an encoder computed once at the input's length
        # (MPNet's; T5's carries the mask too): the tokens get bias 0, no position relative to the text
        for key in ("attention_mask", "position_bias"):
            value = a.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                a[key] = _widen(value, base, self.n_in + self.cls, self.n_blk)
        return a.result()

    def _place(self, h: torch.Tensor, m: TokenModule) -> torch.Tensor:
        """Replace the first min(n, present) token positions with m's tokens and insert the rest
        after the positions already present."""
        toks = m.batch_tokens(h)  # (B, n, H)
        n, start = toks.shape[1], self.n_in + self.cls
        k = min(n, self.n_blk)
        old = h[:, start:start + k]
        g = m.gate
        replaced = toks[:, :k] if isinstance(g, float) and g == 1.0 else old + g * (toks[:, :k] - old)
        parts = [h[:, :start], replaced, h[:, start + k:start + self.n_blk], m.gated(toks[:, k:]),
                 h[:, start + self.n_blk:]]
        self.n_blk = max(self.n_blk, n)
        return torch.cat(parts, dim=1)

    def _after(self, _mod: nn.Module, _args: tuple, out: Any) -> Any:
        if self.keep or not (self.n_in or self.n_blk) or self.length is None:
            return None
        if isinstance(out, torch.Tensor):
            return self._strip(out)
        if isinstance(out, tuple):
            return (self._strip(out[0]), *out[1:])
        for key in ("last_hidden_state", "hidden_states"):
            value = out.get(key) if hasattr(out, "get") else None
            if isinstance(value, torch.Tensor):
                out[key] = self._strip(value)
            elif isinstance(value, tuple):
                out[key] = tuple(self._strip(v) for v in value)
        return out

    def _strip(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n_in + cls + n_blk + rest, H) -> (B, cls + rest, H): the caller's positions."""
        if t.dim() < 3 or self.length is None:
            return t
        blk = t.shape[1] - self.n_in - self.length
        if blk < 0 or blk > self.n_blk:
            return t
        start = self.n_in + self.cls
        return torch.cat([t[:, self.n_in:start], t[:, start + blk:]], dim=1)

    def _extend_encoder_mask(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Decoder pre-hook: prepend ones to encoder_attention_mask for the encoder's prompt positions."""
        a = Call(self._consumer_sig, args, kwargs)
        enc, mask = a.get("encoder_hidden_states"), a.get("encoder_attention_mask")
        if not (isinstance(enc, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return None
        extra = enc.shape[1] - mask.shape[1]
        if extra <= 0:
            return None
        a["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)
        return a.result()


class Call:
    """A hooked call's arguments by parameter name (through the forward's signature), changed in
    place: an argument passed by position stays positional, any other is passed by keyword, so that
    decorators between __call__ and forward (transformers' config defaults) see the same form."""

    def __init__(self, sig: inspect.Signature, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = list(args), dict(kwargs)
        self.positions = {p.name: i for i, p in enumerate(sig.parameters.values())
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def get(self, name: str, default: Any = None) -> Any:
        i = self.positions.get(name)
        if i is not None and i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __setitem__(self, name: str, value: Any) -> None:
        i = self.positions.get(name)
        if i is not None and i < len(self.args):
            self.args[i] = value
        else:
            self.kwargs[name] = value

    def result(self) -> tuple[tuple, dict]:
        return tuple(self.args), self.kwargs


def _widen(mask: torch.Tensor, base: int, start: int, n: int) -> torch.Tensor:
    """A (B, 1, Q, K) mask built for `base` positions, widened by n token positions at `start`:
    keys attend (True / 0 additive / 1), token queries copy the row before them (key padding)."""
    if n == 0:
        return mask
    if mask.shape[-1] == base:
        fill = True if mask.dtype == torch.bool else 0 if mask.is_floating_point() else 1
        cols = torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask[..., :start], cols, mask[..., start:]], dim=-1)
    if mask.shape[-2] == base:
        row = mask[..., max(start - 1, 0):max(start, 1), :]
        rows = row.expand(*row.shape[:-2], n, row.shape[-1])
        mask = torch.cat([mask[..., :start, :], rows, mask[..., start:, :]], dim=-2)
    return mask
