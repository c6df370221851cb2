"""ModelGraph: the networkx view of a model that every plugin and strategy works on.

Built from `named_modules()` alone, so it works on any `nn.Module` and on the meta device (a 7B
config costs no memory). Repeated blocks are found structurally (a ModuleList of same-typed
children), roles come from `roles.py`, and each node gets a canonical, backbone-independent name
such as `encoder.L3.attn.q`. Execution order (forward hooks) and dataflow edges (`torch.export`)
are optional extras added on request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx

from petlsearch.searchspace import roles as R
from petlsearch.searchspace.structural import fill_roles

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Node:
    """One module of the model."""

    path: str
    type: str
    name: str
    role: str | None = None
    layer: int | None = None
    stack: str | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_features: int | None = None
    out_features: int | None = None
    role_from: str | None = None  # "structure" where searchspace.structural found the role, not a name

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.params.values())


@dataclass(frozen=True)
class Block:
    """A repeated block (transformer layer, MBConv block) of one stack."""

    stack: str
    layer: int
    path: str


def _features(module: nn.Module, type_name: str) -> tuple[int | None, int | None]:
    if type_name == "Conv1D":  # transformers' GPT-2 projection: weight is (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    for a, b in (("in_features", "out_features"), ("in_channels", "out_channels"),
                 ("num_embeddings", "embedding_dim")):
        if hasattr(module, a) and hasattr(module, b):
            return int(getattr(module, a)), int(getattr(module, b))
    if "Norm" in type_name and getattr(module, "weight", None) is not None:
        n = int(module.weight.shape[0])
        return n, n
    return None, None


def _find_block_lists(model: nn.Module) -> list[tuple[str, list[str]]]:
    """ModuleLists of >= 2 children of one type that hold parameters: the repeated blocks."""
    from torch import nn

    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        types = {type(child) for child in module}
        if len(types) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue  # a list nested inside a block belongs to that block
        found.append((path, [f"{path}.{i}" if path else str(i) for i in range(len(module))]))
    return found


POOLED_HEADS = ("ForSequenceClassification", "ForImageClassification", "ForMultipleChoice")


class ModelGraph:
    """Modules as nodes (keyed by path) with containment edges, roles, layers and stacks."""

    def __init__(self, nodes: dict[str, Node], blocks: list[Block], family: str,
                 info: dict[str, Any]) -> None:
        self.nodes = nodes
        self.blocks = blocks
        self.family = family
        self.info = info
        self.g = nx.DiGraph()
        for node in nodes.values():
            self.g.add_node(node.path, **asdict(node))
        for path in nodes:
            if path:
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                if parent in nodes:
                    self.g.add_edge(parent, path, kind="contains")
        self._by_name = {n.name: n for n in nodes.values()}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, family: str | None = None) -> ModelGraph:
        """Build the graph of `model`; never raises on an unfamiliar model, it warns instead."""
        family = family or R.family_of(model)
        block_lists = _find_block_lists(model)
        block_of: dict[str, Block] = {}
        blocks: list[Block] = []
        for list_path, paths in block_lists:
            stack = R.stack_of(list_path, family)
            for i, p in enumerate(paths):
                block = Block(stack, i, p)
                blocks.append(block)
                block_of[p] = block
        if not blocks:
            warnings.warn(f"petlsearch: no repeated blocks recognised in {type(model).__name__}; only its "
                          "Linear/Conv/Norm/Embedding modules outside blocks get sites", stacklevel=2)
        default_stack = blocks[0].stack if blocks else "encoder"
        nodes: dict[str, Node] = {}
        for path, module in model.named_modules():
            nodes[path] = cls._make_node(path, module, block_of, default_stack, model)
        fill_roles(nodes, blocks, R.LINEAR_TYPES)  # where no name rule knew a Linear of a block
        cls._mark_containers(nodes)
        cls._name_nodes(nodes, [b.path for b in blocks])
        info = cls._read_info(model, nodes, blocks)
        info["tied"] = _tied_parameters(model)
        unroled = [n.path for n in nodes.values() if n.role is None and n.type in R.LINEAR_TYPES]
        if unroled:
            log.info("no role for %d Linear modules, e.g. %s", len(unroled), unroled[:3])
        return cls(nodes, blocks, family, info)

    @staticmethod
    def _make_node(path: str, module: nn.Module, block_of: dict[str, Block], default_stack: str,
                   model: nn.Module) -> Node:
        type_name = R.type_name(module)
        params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        fin, fout = _features(module, type_name)
        block = None
        for bpath, b in block_of.items():
            if path == bpath or path.startswith(bpath + "."):
                block = b
                break
        if block is not None:
            role = "block" if path == block.path else R.block_role(path[len(block.path) + 1:], type_name)
            return Node(path, type_name, path, role, block.layer, block.stack, params, fin, fout)
        role = R.outer_role(path, type_name) if path else None
        stack = "head" if role == "head" else R.stack_of(path, "") if _has_stack_hint(path) else default_stack
        return Node(path, type_name, path, role, None, stack, params, fin, fout)

    @staticmethod
    def _name_nodes(nodes: dict[str, Node], block_paths: list[str]) -> None:
        """Canonical names `{stack}.L{layer}.{role}`; where a role repeats, a container that holds
        all the others keeps the plain name and the rest add the shortest unique tail of their path."""
        def base(n: Node) -> str:
            if n.role == "head":
                return "head"
            where = f"{n.stack}.L{n.layer}" if n.layer is not None else f"{n.stack}"
            return f"{where}.{n.role}"

        groups: dict[str, list[Node]] = {}
        for n in nodes.values():
            if n.role is not None:
                groups.setdefault(base(n), []).append(n)
        for b, group in groups.items():
            if len(group) == 1:
                group[0].name = b
                continue
            owner = next((n for n in group if all(m is n or m.path.startswith(n.path + ".") for m in group)), None)
            rest = [n for n in group if n is not owner]
            if owner is not None:
                owner.name = b
            # tails of the path inside the block, so that the layer number never enters a name
            parts = [_inside_block(n.path, block_paths).split(".") for n in rest]
            for k in range(1, 8):
                tails = [".".join(p[-k:]).strip("_") for p in parts]
                if len(set(tails)) == len(tails):
                    break
            for n, tail in zip(rest, tails):
                n.name = f"{b}.{tail}"

    @staticmethod
    def _mark_containers(nodes: dict[str, Node]) -> None:
        """The module holding q/k/v is 'attn' (where attention is computed); the common parent of
        ffn.up and ffn.down is 'ffn' when it is not the block itself (BERT has none)."""
        for n in list(nodes.values()):
            if n.role in ("attn.q", "attn.qkv", "xattn.q"):
                parent = nodes.get(n.path.rsplit(".", 1)[0])
                if parent is not None and parent.role is None:
                    parent.role = n.role.split(".")[0]
            if n.role == "ffn.down":
                parent = nodes.get(n.path.rsplit(".", 1)[0])
                ups = [m for m in nodes.values() if m.role == "ffn.up" and m.layer == n.layer
                       and m.stack == n.stack]
                if parent is not None and parent.role is None and ups and ups[0].path.startswith(parent.path + "."):
                    parent.role = "ffn"

    @staticmethod
    def _read_info(model: nn.Module, nodes: dict[str, Node], blocks: list[Block]) -> dict[str, Any]:
        """Per-stack hidden size, heads and depth, read from the modules and the config."""
        config = getattr(model, "config", None)
        info: dict[str, Any] = {"model_type": type(model).__name__, "stacks": {}}
        for stack in dict.fromkeys(b.stack for b in blocks):
            layers = [b for b in blocks if b.stack == stack]
            q = next((n for n in nodes.values() if n.stack == stack and n.role in ("attn.q", "attn.qkv")), None)
            attn = nodes.get(q.path.rsplit(".", 1)[0]) if q else None
            heads = _heads_of(model, attn.path if attn else None, config, stack)
            hidden = q.in_features if q else None
            info["stacks"][stack] = {"layers": len(layers), "hidden_size": hidden, "num_heads": heads}
        attentions = {type(model.get_submodule(n.path)) for n in nodes.values() if n.role in ("attn", "xattn")}
        info["prefixable"] = sorted(c.__name__ for c in attentions if R.dispatches_attention(c))  # kv_prefix sites
        if config is not None and hasattr(config, "to_dict"):
            info["config"] = {k: v for k, v in config.to_dict().items()
                              if isinstance(v, (int, float, str, bool)) or v is None}
        return info

    # ---------------------------------------------------------------- queries
    def node(self, path: str) -> Node:
        return self.nodes[path]

    def by_name(self, name: str) -> Node | None:
        return self._by_name.get(name)

    def find(self, role: str | tuple[str, ...] | None = None, stack: str | None = None,
             layer: int | None = None, type: str | None = None) -> list[Node]:
        """Nodes matching every given filter, in module order."""
        roles = (role,) if isinstance(role, str) else role
        return [
            n for n in self.nodes.values()
            if (roles is None or n.role in roles) and (stack is None or n.stack == stack)
            and (layer is None or n.layer == layer) and (type is None or n.type == type)
        ]

    @property
    def stacks(self) -> list[str]:
        return list(self.info["stacks"])

    @property
    def pooled_head(self) -> bool:
        """Whether the head reads one pooled vector per input, not every position (token tasks, LMs)."""
        return self.info.get("model_type", "").endswith(POOLED_HEADS)

    def layers(self, stack: str) -> list[int]:
        return [b.layer for b in self.blocks if b.stack == stack]

    def hidden_size(self, stack: str) -> int | None:
        return self.info["stacks"].get(stack, {}).get("hidden_size")

    def num_heads(self, stack: str) -> int | None:
        return self.info["stacks"].get(stack, {}).get("num_heads")

    def parent(self, path: str) -> Node | None:
        return self.nodes.get(path.rsplit(".", 1)[0] if "." in path else "")

    def num_parameters(self, include_head: bool = False) -> int:
        """Parameters of the model; without the task head unless asked (budgets count the backbone).
        A parameter shared by several modules (tied embeddings) is counted once."""
        tied = self.info.get("tied", {})
        return sum(n.numel - _numel(n.params, tied.get(n.path, ())) for n in self.nodes.values()
                   if include_head or n.stack != "head")

    def fingerprint(self) -> str:
        """sha256 of the parameter shapes and the config: the same backbone shape gives the same print."""
        shapes = {p: {k: list(v) for k, v in n.params.items()} for p, n in self.nodes.items()
                  if n.params and n.stack != "head"}
        payload = json.dumps({"shapes": shapes, "config": _config_for_print(self.info)}, sort_keys=True)
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per roled node: name, role, layer, stack, type, shape; for tables and the CLI."""
        return [
            {"name": n.name, "role": n.role, "layer": n.layer, "stack": n.stack, "type": n.type,
             "in": n.in_features, "out": n.out_features, "params": n.numel, "path": n.path,
             "from": n.role_from or "name"}
            for n in self.nodes.values() if n.role is not None
        ]

    # ---------------------------------------------------------------- optional extras
    def add_execution_order(self, model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
        """Run one forward with hooks and link roled modules in call order ('next' edges)."""
        import torch

        order: list[str] = []
        wanted = {p for p, n in self.nodes.items() if n.role is not None}
        handles = [
            m.register_forward_pre_hook(lambda mod, _a, p=p: order.append(p))
            for p, m in model.named_modules() if p in wanted
        ]
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for i, p in enumerate(order):
            self.g.nodes[p].setdefault("order", i)
        for a, b in zip(order, order[1:]):
            self.g.add_edge(a, b, kind="next")
        return order

    def add_dataflow(self, model: nn.Module, kwargs: dict[str, Any]) -> int:
        """Dataflow edges between roled modules from `torch.export(strict=False)`; returns the count."""
        import torch

        program = torch.export.export(model, (), kwargs, strict=False)
        roled = {p for p, n in self.nodes.items() if n.role is not None}
        owner: dict[Any, str] = {}
        added = 0
        for fx_node in program.graph.nodes:
            stack = fx_node.meta.get("nn_module_stack") or {}
            paths = [_export_path(v[0]) for v in stack.values()]
            here = next((p for p in reversed(paths) if p in roled), None)
            sources = {owner[a] for a in fx_node.all_input_nodes if a in owner}
            if here is not None:
                for src in sources - {here}:
                    if not self.g.has_edge(src, here):
                        self.g.add_edge(src, here, kind="flow")
                        added += 1
                owner[fx_node] = here
            elif len(sources) == 1:
                owner[fx_node] = next(iter(sources))
        return added


def _tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """{module path: [parameter names]} of parameters that alias one seen earlier (tied weights)."""
    seen: set[int] = set()
    tied: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            path, _, leaf = name.rpartition(".")
            tied.setdefault(path, []).append(leaf)
        seen.add(id(p))
    return tied


def _numel(params: dict[str, tuple[int, ...]], names: Any) -> int:
    total = 0
    for name in names:
        n = 1
        for d in params.get(name, (0,)):
            n *= d
        total += n
    return total


def _inside_block(path: str, block_paths: list[str]) -> str:
    """`path` relative to the block that holds it (the path itself outside blocks)."""
    for b in block_paths:
        if path.startswith(b + "."):
            return path[len(b) + 1:]
    return path


def _has_stack_hint(path: str) -> bool:
    low = path.lower()
    return any(h in low for h in ("vision", "visual", "text", "decoder", "encoder"))


def _export_path(key: str) -> str:
    """torch.export writes module paths like 'L__self___bert_encoder' or 'bert.encoder'; normalise."""
    return key.replace("L['self'].", "").replace("L__self___", "").replace("._modules['", ".").replace("']", "")


def _config_for_print(info: dict[str, Any]) -> dict[str, Any]:
    skip = {"_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
            "num_labels", "problem_type", "torch_dtype", "dtype", "_attn_implementation"}
    return {k: v for k, v in info.get("config", {}).items() if k not in skip}


def _heads_of(model: nn.Module, attn_path: str | None, config: Any, stack: str) -> int | None:
    if attn_path:
        attn = model.get_submodule(attn_path)
        for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            value = getattr(attn, attr, None)
            if isinstance(value, int):
                return value
        sub = getattr(attn, "config", None)
        if getattr(sub, "num_attention_heads", None):
            return int(sub.num_attention_heads)
    for cfg in (getattr(config, f"{stack}_config", None), config):
        for attr in ("num_attention_heads", "n_head", "num_heads"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                return value
    return None
