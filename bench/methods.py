"""The methods the benchmarks compare, each set up the same way on a fresh, frozen model.

- a petlsearch plugin at its default size: every site the plugin has (optionally filtered by
  role), each with the plugin's default config;
- full fine-tuning (every parameter) and head-only (the new task head alone);
- Hugging Face peft's LoRA, IA3 and prompt tuning on exactly the modules petlsearch's plugin uses
  (targets are the full module paths of our sites), so that a difference is the implementation's.

Every method trains the new task head too (it is random): `Prepared.head` holds it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from petlsearch.plugins import create_plugin
from petlsearch.runners.trainer import ParamGroup, TrainConfig, freeze_backbone, head_parameters, recipe_groups
from petlsearch.runtime import seed_everything
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.recipe import Recipe

if TYPE_CHECKING:
    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.sites import Site

PEFT_KINDS = ("lora", "ia3", "prompt_tuning")
# the baseline's rate, as BERT's fine-tuning (Devlin et al., 2019: 2e-5 to 5e-5)
FULL_FINETUNING = Recipe(lr=5e-5, source="Devlin et al., BERT, NAACL 2019: fine-tuning at 2e-5 to 5e-5")
PREPARE_BATCHES = 8  # as runners.trial: batches a data-driven plugin may look at


@dataclass
class Prepared:
    """A model ready to train: the method's parameters, the head's, and (plugins) its placements."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    head: list[nn.Parameter]
    placements: list[tuple[Plugin, Site, dict[str, Any]]] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    recipe: Recipe | None = None  # how `params` train (None: nothing besides the head)

    @property
    def trainable(self) -> int:
        """The method's trainable parameters, the head excluded."""
        head = {id(p) for p in self.head}
        return sum(p.numel() for p in _unique(self.params) if id(p) not in head)

    def groups(self, cfg: TrainConfig) -> list[ParamGroup]:
        """The method's parameters at its recipe (scaled or replaced as `cfg` says), the head's."""
        head = {id(p) for p in self.head}
        own = [p for p in _unique(self.params) if id(p) not in head]
        recipes = {self.name: self.recipe} if self.recipe is not None else {}
        return recipe_groups({self.name: own} if own else {}, recipes, _unique(self.head), cfg)

    def all_params(self) -> list[nn.Parameter]:
        return _unique([*self.params, *self.head])


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _head(model: nn.Module, graph: ModelGraph) -> list[nn.Parameter]:
    head = head_parameters(model, graph)
    for p in head:
        p.requires_grad_(True)
    return head


def fresh_model(task: Any, seed: int) -> nn.Module:
    """A fresh copy of the task's model, with the global seed set first so that what is attached to
    it (random module initialisations) starts the same whatever ran before in the process."""
    seed_everything(seed)
    return task.make_model()


def plugin_sites(plugin: Plugin, graph: ModelGraph, roles: Sequence[str] | None = None) -> list[Site]:
    sites = plugin.sites(graph)
    if roles is not None:
        sites = [s for s in sites if any(s.role == r or s.role.startswith(r + ".") for r in roles)]
    return sites


def apply_plugin(model: nn.Module, name: str, batches: Iterable[dict[str, Any]] | None = None,
                 roles: Sequence[str] | None = None, config: dict[str, Any] | None = None,
                 graph: ModelGraph | None = None, new_head: bool = True, **plugin_kwargs: Any) -> Prepared:
    """`name` at every site (of `roles`) with its default config (updated by `config`). Pass the
    `graph` of the bare model when another method is already attached; `new_head=False` for a
    causal LM, whose pretrained output layer stays frozen."""
    freeze_backbone(model)
    graph = graph or ModelGraph.from_model(model)
    plugin = create_plugin(name, **plugin_kwargs)
    if plugin.needs_data:
        if batches is None:
            raise ValueError(f"plugin '{name}' needs data: pass batches")
        plugin.prepare(model, itertools.islice(batches, PREPARE_BATCHES))
    sites = plugin_sites(plugin, graph, roles)
    if not sites:
        raise ValueError(f"plugin '{name}' has no site on {type(model).__name__}")
    placements, params, modules = [], [], []
    for site in sites:
        cfg = plugin.config(site, {k: v for k, v in (config or {}).items() if k in plugin.dims(site)})
        module = plugin.attach(model, site, cfg)
        params.extend(p for p in module.parameters() if p.requires_grad)
        placements.append((plugin, site, cfg))
        modules.append(module)
    return Prepared(name, model, params, _head(model, graph) if new_head else [], placements, modules, plugin.recipe)


def full_finetuning(model: nn.Module, new_head: bool = True) -> Prepared:
    """Every parameter at the fine-tuning rate, a new head at the head rate (a causal LM's output
    layer, often the embeddings themselves, is no new head: `new_head=False`)."""
    graph = ModelGraph.from_model(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared("full fine-tuning", model, list(model.parameters()),
                    head_parameters(model, graph) if new_head else [], recipe=FULL_FINETUNING)


def head_only(model: nn.Module) -> Prepared:
    freeze_backbone(model)
    graph = ModelGraph.from_model(model)
    return Prepared("head only", model, [], _head(model, graph))


def peft_targets(graph: ModelGraph, plugin: str, roles: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(module paths, feed-forward paths) of our plugin's sites: peft's targets for the same modules."""
    sites = plugin_sites(create_plugin(plugin), graph, roles)
    paths = sorted({s.path for s in sites})
    ff = sorted({s.path for s in sites if s.get("where") == "input"})
    return paths, ff


def apply_peft(model: nn.Module, kind: str, roles: Sequence[str] | None = None, rank: int = 8, alpha: int = 16,
               tokens: int = 20) -> Prepared:
    """peft's `kind` (lora, ia3, prompt_tuning) on the modules our plugin of that name targets."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    freeze_backbone(model)
    graph = ModelGraph.from_model(model)
    head_paths = [n.path for n in graph.find(role="head")]
    if kind == "lora":
        paths, _ = peft_targets(graph, "lora", roles)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0, bias="none")
    elif kind == "ia3":
        paths, ff = peft_targets(graph, "ia3", roles)
        config = IA3Config(target_modules=paths, feedforward_modules=ff)
    elif kind == "prompt_tuning":
        # peft prepends tokens only for a task type; SEQ_CLS also wraps the head in modules_to_save
        config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens)
    else:
        raise ValueError(f"unknown peft method {kind!r}; valid: {PEFT_KINDS}")
    wrapped = get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if any(h in name for h in head_paths) and "original_module" not in name:
            p.requires_grad_(True)
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if any(h in n for h in head_paths)]
    # peft's method trains at the recipe of our plugin of the same name: a difference is the implementation's
    return Prepared(f"peft {kind}", wrapped, [p for _, p in trainable], head, recipe=create_plugin(kind).recipe)
