"""Training memory, modelled from the graph without building anything (`measure.py` measures it).

Parameter-efficient methods save stored parameters but often little training memory, because the
gradient still travels back through the frozen backbone (Sung et al., LST: Ladder Side-Tuning for
Parameter and Memory Efficient Transfer Learning, NeurIPS 2022). The model here adds up:

- frozen weights: the backbone's parameters (tied ones once) at `shape.dtype_bytes` each;
- trainable state: each trainable parameter, its gradient and AdamW's two moments (16 bytes in fp32);
- activations that backward must keep. Layers below the lowest placement that needs a gradient
  through the backbone keep nothing (their inputs need no grad and their weights are frozen), so a
  stack costs the blocks from that placement up (`BlockProfile.elements`, per token, calibrated
  against `measure` on BERT, T5 and ViT), its final norm, and the loss' logits. Token placements
  (prompts) make the blocks from their layer up run on a longer sequence; an update of a
  projection's weight (FISH, DSEE, KAdaptation) makes the effective weight a tensor that needs a
  gradient, so that projection keeps its input and the dense effective weight. Query placements (VQT)
  and side networks (LST) need no backprop through the backbone: they cost their own activations.

`estimate` is what budgets and strategies use; `searchspace.measure.measure` is the ground truth it
is tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from petlsearch.searchspace.bound import count_bound

if TYPE_CHECKING:
    from collections.abc import Sequence

    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.sites import Site
    from petlsearch.searchspace.bound import Bound

# Levels inside a block where a placement can sit; a block keeps the activations at and above it.
BELOW, ATTN_IN, ATTN_V, ATTN_OUT, XATTN_IN, XATTN_OUT, FFN_IN, FFN_OUT = range(-1, 7)
_ROLE_LEVEL = {
    "attn.q": ATTN_IN, "attn.k": ATTN_IN, "attn.v": ATTN_V, "attn.qkv": ATTN_IN, "block": BELOW,
    "attn.o": ATTN_OUT, "attn": ATTN_OUT,
    "xattn.q": XATTN_IN, "xattn.k": XATTN_IN, "xattn.v": XATTN_IN, "xattn.o": XATTN_OUT, "xattn": XATTN_OUT,
    "ffn.up": FFN_IN, "ffn.gate": FFN_IN, "ffn.down": FFN_OUT, "ffn": FFN_OUT,
}
_PROJECTIONS = {role for role in _ROLE_LEVEL if role.startswith(("attn.", "xattn.", "ffn."))}
# kinds whose gradient reaches them through the backbone (the others cost their own activations)
THROUGH_KINDS = ("weight", "sequential", "parallel", "scale", "tokens", "kv_prefix")
# elements an activation function saves per FFN element (measured: exact GELU / ReLU / SiLU keep one
# tensor, QuickGELU x * sigmoid(1.702 x) two, the tanh-formula GELU of T5 v1.1 / GPT-2 four)
_ACT_SAVES = {"GELUActivation": 1, "GELU": 1, "ReLU": 1, "SiLU": 1, "SiLUActivation": 1, "Tanh": 1,
              "GELUTanh": 1, "PytorchGELUTanh": 1, "NewGELUActivation": 4, "FastGELUActivation": 3,
              "QuickGELUActivation": 2}
_POST_LN = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "albert", "mpnet", "ernie"}



@dataclass(frozen=True)
class BatchShape:
    """The batch a memory estimate is for: sequences of `seq` tokens (or patches), fp32 by default."""

    batch: int = 32
    seq: int = 64
    dtype_bytes: int = 4

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

@dataclass(frozen=True)
class BlockProfile:
    """The facts that decide what a transformer block keeps for backward, and the count itself.

    Calibrated against `measure` (torch 2.13, CPU, fp32): with frozen weights a Linear keeps nothing
    (autograd saves its input only for a weight gradient); LayerNorm keeps its input and two
    statistics per token, RMS norms their input and one; attention keeps q, k, v and the softmax
    output (seq * heads per token), plus the dropout mask and dropped probabilities when attention
    dropout is on, or q, k, v, output and a log-sum-exp per head on the fused (flash) path that SDPA
    takes without dropout on CPU and always on CUDA; dropout keeps a mask (fp32 on CPU, bool on CUDA).
    """

    hidden: int
    inner: int  # heads * head_dim
    ffn: int
    heads: int
    norm_stats: int = 2  # LayerNorm: mean and rstd; RMS norms: rstd only
    post_norm: bool = False  # BERT-style norm after the residual add
    act: float = 1.0  # tensors of FFN width the activation keeps
    gated: bool = False  # act(gate(x)) * up(x) keeps both factors
    cross: bool = False  # decoder block with cross-attention
    attn_dropout: bool = False
    hidden_dropout: bool = False
    ffn_dropout: bool = False  # dropout inside the FFN (T5)
    lean: bool = False  # petlsearch's lean attention (LST side blocks): q, k, v, lse, a 1-byte mask

    def scaled(self, r: int) -> BlockProfile:
        """The same block at 1/r of the width (same heads), with lean attention: an LST side block."""
        return replace(self, hidden=max(1, self.hidden // r), inner=self.heads * max(1, self.inner // self.heads // r),
                       ffn=max(1, self.ffn // r), lean=True)

    def elements(self, tokens: int, seq: int, start: int = BELOW, trainable: bool = False,
                 device: str = "cpu", sdpa: bool = True, kv_grad: bool = True) -> float:
        """fp32-equivalent elements kept for `tokens` tokens (sequences of `seq`) by the parts of
        the block that the gradient crosses from level `start` up (BELOW: the whole block).
        `trainable` adds what trained weights keep (their layers' inputs, RMS norms' normalised
        input); `kv_grad` is False when cross-attention reads an encoder that needs no gradient."""
        h, f, mask = self.hidden, self.ffn, (1.0 if device == "cpu" else 0.25)
        norm = h + self.norm_stats
        drop = mask * h if self.hidden_dropout else 0.0
        ffn_act = self.act * f + (2 * f if self.gated else 0) + (mask * f if self.ffn_dropout else 0)
        pre, post = (0.0, norm) if self.post_norm else (norm, 0.0)
        # (level, elements): a pre-norm sits below its sublayer, so a placement inside it skips it
        core, core_v = self._core(seq, device, sdpa, True), self._core_v(seq, device, sdpa)
        parts = [(BELOW, pre), (ATTN_IN, core - core_v), (ATTN_V, core_v), (ATTN_OUT, drop + post)]
        if self.cross:
            parts += [(ATTN_OUT, pre), (XATTN_IN, self._core(seq, device, sdpa, kv_grad)),
                      (XATTN_OUT, drop + post)]
        parts += [(XATTN_OUT, pre), (FFN_IN, ffn_act), (FFN_OUT, drop + post)]
        per_token = sum(e for level, e in parts if level >= start)
        if trainable:
            norms = 3 if self.cross else 2
            per_token += 2 * h + self.inner + f + (h if self.cross else 0) + (norms * h if self.norm_stats == 1 else 0)
        return tokens * per_token

    def _core_v(self, seq: int, device: str, sdpa: bool) -> float:
        """What attention keeps when only v needs a gradient: the (dropped) probabilities, or
        everything on the fused and lean paths."""
        if self.lean or (sdpa and (device != "cpu" or not self.attn_dropout)):
            return self._core(seq, device, sdpa, True)
        return self.heads * seq

    def _core(self, seq: int, device: str, sdpa: bool, kv_grad: bool) -> float:
        """Attention per query token (keys as many as queries)."""
        if self.lean:  # q, k, v, the log-sum-exp per head, and a 1-byte dropout mask
            return 3 * self.inner + self.heads + (0.25 * self.heads * seq if self.attn_dropout else 0.0)
        if sdpa and (device != "cpu" or not self.attn_dropout):  # fused kernel: q, k, v, out, lse
            return 4 * self.inner + self.heads
        mask = 1.0 if device == "cpu" else 0.25
        probs = self.heads * seq * ((2 + mask) if self.attn_dropout else 1)
        if not kv_grad:  # only q needs a gradient: k, v, softmax output and mask are kept
            return 2 * self.inner + self.heads * seq * ((1 + mask) if self.attn_dropout else 1)
        return 3 * self.inner + probs


def _config_value(graph: ModelGraph, *keys: str) -> float:
    config = graph.info.get("config", {})
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def block_profile(graph: ModelGraph, stack: str) -> BlockProfile:
    """The profile of the first block of `stack`, read from its nodes and the model's config."""
    block = next(b for b in graph.blocks if b.stack == stack)
    nodes = [n for n in graph.nodes.values() if n.path.startswith(block.path + ".")]
    hidden = graph.hidden_size(stack) or 1
    heads = graph.num_heads(stack) or 1

    def out_of(*roles: str) -> int | None:
        return next((n.out_features for n in nodes if n.role in roles and n.out_features), None)

    qkv = out_of("attn.qkv")
    inner = out_of("attn.q") or (qkv // 3 if qkv else hidden)
    ffn = out_of("ffn.up", "ffn.gate") or 4 * hidden
    norms = [n for n in nodes if n.role == "norm"]
    act = next((_ACT_SAVES[n.type] for n in nodes if n.type in _ACT_SAVES), 1)
    ffn_paths = [n.path for n in nodes if n.role == "ffn"]
    ffn_dropout = any(n.type == "Dropout" and any(n.path.startswith(p + ".") for p in ffn_paths) for n in nodes)
    p_attn = _config_value(graph, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout_rate")
    p_hidden = _config_value(graph, "hidden_dropout_prob", "resid_pdrop", "dropout_rate", "hidden_dropout")
    return BlockProfile(
        hidden=hidden, inner=inner, ffn=ffn, heads=heads,
        norm_stats=2 if all(n.type == "LayerNorm" for n in norms) else 1,
        post_norm=graph.family in _POST_LN, act=act, gated=any(n.role == "ffn.gate" for n in nodes),
        cross=any(n.role and n.role.startswith("xattn") for n in nodes),
        attn_dropout=p_attn > 0, hidden_dropout=p_hidden > 0, ffn_dropout=ffn_dropout and p_hidden > 0,
    )


@dataclass
class MemoryEstimate:
    """Peak training memory in bytes: `total` = weights + trainable_state + activations."""

    total: int
    weights: int
    trainable_state: int
    activations: int
    breakdown: dict[str, int] = field(default_factory=dict)


def bytes_per_trainable(dtype_bytes: int = 4, optimizer: str = "adamw") -> int:
    """A trainable parameter, its gradient and the optimizer's state (AdamW: two moments)."""
    return {"adamw": 4, "sgd": 2}[optimizer] * dtype_bytes


def estimate(graph: ModelGraph, placements: Sequence[Bound], shape: BatchShape, *, device: str = "cpu",
             attention: str = "sdpa", optimizer: str = "adamw") -> MemoryEstimate:
    """Peak training memory of `placements` (bound: configs checked, as `SearchSpace.bound` and
    `Structure.resolve` give them) on the model of `graph` for batches of `shape`.

    `shape.seq` is the length of every stack's sequences (patches + class token for ViT, the
    decoder's too for T5). `device` 'cpu' is calibrated against `measure`; 'cuda' assumes bool
    dropout masks and fused attention. `attention` is the model's attention implementation.
    """
    dt = shape.dtype_bytes
    weights = graph.num_parameters(include_head=True) * dt
    trainable = count_bound(placements) * bytes_per_trainable(dt, optimizer)
    breakdown = _activations(graph, placements, shape, device=device, sdpa=attention == "sdpa")
    activations = int(round(sum(breakdown.values()) * dt))
    breakdown = {k: int(round(v * dt)) for k, v in breakdown.items()}
    breakdown.update(weights=weights, trainable_state=trainable)
    return MemoryEstimate(weights + trainable + activations, weights, trainable, activations, breakdown)


def _own_elements(plugin: Plugin, site: Site, cfg: dict[str, Any], shape: BatchShape) -> float:
    """A placement's own activations, where the plugin does not declare them: a scale (IA3) keeps
    the tensor it multiplies; an update of a projection's weight makes the matmul keep its input
    and the effective weight (measured: FISH, DSEE, KAdaptation), a bias or norm update nothing."""
    declared = plugin.activation_elements(site, cfg, shape)
    if declared is not None:
        return declared
    if site.kind == "scale":
        return shape.tokens * ((site.in_features if site.get("where") == "input" else site.out_features) or 0)
    if (site.kind == "weight" and (site.param or "weight") == "weight" and site.role in _PROJECTIONS
            and site.in_features and site.out_features):
        return shape.tokens * site.in_features + site.in_features * site.out_features
    return 0.0


def _added_tokens(graph: ModelGraph, placements: Sequence[Bound]) -> dict[str, list[int]]:
    """Per stack, the positions token placements add to each layer's sequence: input-level tokens
    join every layer; a layer's prompts (VPT) replace the previous layer's, so the longest counts."""
    inputs: dict[str, int] = {}
    deep: dict[str, list[int]] = {}
    for plugin, site, cfg in placements:
        n = plugin.added_tokens(site, plugin.config(site, cfg))
        if not n or site.stack not in graph.stacks:
            continue
        layers = len(graph.layers(site.stack))
        if site.layer is None:
            inputs[site.stack] = inputs.get(site.stack, 0) + n
        else:
            row = deep.setdefault(site.stack, [0] * layers)
            for i in range(site.layer, layers):
                row[i] = max(row[i], n)
    return {stack: [inputs.get(stack, 0) + d for d in deep.get(stack, [0] * len(graph.layers(stack)))]
            for stack in graph.stacks}


def _level(graph: ModelGraph, site: Site) -> int:
    """Where inside its block a placement sits: its gradient needs the parts at and above it."""
    if site.kind == "tokens":
        return BELOW  # tokens join the block's input
    if site.kind == "kv_prefix":
        return XATTN_IN if site.role.startswith("xattn") else ATTN_IN
    if site.role == "norm":
        cross = any(n.role == "xattn.q" for n in graph.find(stack=site.stack, layer=site.layer))
        attn = re.search(r"before|norm1|ln_1|input_layernorm|attention|layer\.0\.", site.path)
        sub = 0 if attn else 1 if cross and "layer.1." in site.path else 2
        if graph.family in _POST_LN:  # the norm after the sublayer
            return (ATTN_OUT, XATTN_OUT, FFN_OUT)[sub]
        return (BELOW, ATTN_OUT, XATTN_OUT)[sub]  # before it: its backward needs its input
    return _ROLE_LEVEL.get(site.role, ATTN_IN)


def _start(graph: ModelGraph, site: Site) -> tuple[int, int] | None:
    """(layer, level) of the lowest backbone activation a through-placement needs; -1 = embeddings."""
    layers = len(graph.layers(site.stack)) if site.stack in graph.stacks else 0
    if site.kind == "side":
        return (layers, ATTN_IN)  # the side output joins after the last block: only the top is traversed
    if site.kind not in THROUGH_KINDS or site.stack not in graph.stacks:
        return None
    if site.layer is None:
        return (-1, ATTN_IN) if site.role == "embed" or "embed" in site.path.lower() else (layers, ATTN_IN)
    return (site.layer, _level(graph, site))


def _shared_inputs(placements: Sequence[Bound], shape: BatchShape) -> float:
    """Placements of one plugin on projections that read the same tensor (q / k / v, up / gate)
    save that input once: autograd keeps one storage."""
    groups: dict[tuple, list[float]] = {}
    for plugin, site, cfg in placements:
        group = {"attn.q": "a", "attn.k": "a", "attn.v": "a", "ffn.up": "f", "ffn.gate": "f",
                 "xattn.k": "x", "xattn.v": "x"}.get(site.role)
        if group and site.kind == "weight" and site.in_features:
            x = shape.tokens * site.in_features
            if _own_elements(plugin, site, plugin.config(site, cfg), shape) >= x:
                groups.setdefault((plugin.name, site.stack, site.layer, group), []).append(x)
    return sum(sum(v[1:]) for v in groups.values())


def _activations(graph: ModelGraph, placements: Sequence[Bound], shape: BatchShape, device: str,
                 sdpa: bool) -> dict[str, float]:
    """fp32-equivalent elements kept for backward, by part: blocks per stack, tops, own, logits."""
    out: dict[str, float] = {}
    if not placements:
        return out
    starts: dict[str, tuple[int, int]] = {}
    own = 0.0
    for plugin, site, cfg in placements:
        own += _own_elements(plugin, site, plugin.config(site, cfg), shape)
        start = _start(graph, site)
        if start is not None:
            starts[site.stack] = min(start, starts.get(site.stack, start))
    own -= _shared_inputs(placements, shape)
    has_xattn = any(n.role == "xattn.q" for n in graph.nodes.values())
    if has_xattn and "encoder" in starts and "decoder" in graph.stacks:  # the gradient reaches the
        starts["decoder"] = min(starts.get("decoder", (0, XATTN_IN)), (0, XATTN_IN))  # encoder via cross-attention
    added = _added_tokens(graph, placements)
    for stack, (layer, level) in starts.items():
        kv_grad = stack != "decoder" or "encoder" in starts
        extra = added[stack]
        out[f"{stack}.blocks"] = _stack_blocks(graph, stack, layer, level, shape, device, sdpa, kv_grad, extra)
        top = replace(shape, seq=shape.seq + (extra[-1] if extra else 0))
        out[f"{stack}.top"] = _stack_top(graph, stack, top, embed=layer < 0)
    out["own"] = own
    out["logits"] = _logits(graph, shape, pooled_inputs=bool(starts))
    return out


def _stack_blocks(graph: ModelGraph, stack: str, layer: int, level: int, shape: BatchShape, device: str,
                  sdpa: bool, kv_grad: bool, added: list[int]) -> float:
    """The blocks from `layer` up, each at its sequence length (`added` tokens longer)."""
    profile = block_profile(graph, stack)
    total = 0.0
    for i in range(max(layer, 0), len(graph.layers(stack))):
        start = level if i == layer else BELOW
        seq = shape.seq + added[i]
        total += profile.elements(shape.batch * seq, seq, start=start, device=device, sdpa=sdpa, kv_grad=kv_grad)
    return total


def _stack_top(graph: ModelGraph, stack: str, shape: BatchShape, embed: bool) -> float:
    """The stack's final norm (and T5's dropout after it); with `embed`, the embeddings' norm and dropout."""
    profile = block_profile(graph, stack)
    norm = shape.tokens * (profile.hidden + profile.norm_stats)
    drop = shape.tokens * profile.hidden if profile.hidden_dropout else 0.0
    outer = [n for n in graph.find(role="norm", stack=stack) if n.layer is None]
    finals = [n for n in outer if "embed" not in n.path.lower() and "pre" not in n.path.split(".")[-1]]
    total = len(finals) * norm + (drop if "t5" in graph.family and finals else 0.0)
    if embed:
        total += (len(outer) - len(finals)) * norm + drop
    return total


def _logits(graph: ModelGraph, shape: BatchShape, pooled_inputs: bool) -> float:
    """The loss keeps the logits; a pooler (BERT) keeps its tanh output and the classifier's dropout mask."""
    pooled = graph.pooled_head
    total = 0.0
    for head in graph.find(role="head"):
        total += (shape.batch if pooled else shape.tokens) * (head.out_features or 0)
    pools = graph.find(role="pool")
    if pools and pooled_inputs:
        hidden = pools[0].out_features or 0
        drop = _config_value(graph, "classifier_dropout", "hidden_dropout_prob") > 0
        total += shape.batch * hidden * (2 if drop else 1)
    return total


def marginal_cost(graph: ModelGraph, plugin: Plugin, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
    """Bytes that one placement adds to the frozen model: its trainable state, its own activations
    and the backbone activations its gradient needs (from its position up), i.e.
    estimate([p]) - estimate([]) without the loss' logits, which every structure pays once.

    Additive approximation for the differentiable search (S3PET's n_i): exact for one placement; for
    a set it over-counts, because the backbone activations are a maximum over placements (the
    lowest one decides), not a sum. A structure is always re-checked with `estimate`.
    """
    alone = estimate(graph, [(plugin, site, cfg)], shape)
    base = estimate(graph, [], shape)
    return alone.total - base.total - alone.breakdown.get("logits", 0)
