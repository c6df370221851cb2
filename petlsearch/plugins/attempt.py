"""ATTEMPT: attentional mixtures of soft prompts (Asai et al., ATTEMPT: Parameter-Efficient
Multi-task Tuning via Attentional Mixtures of Soft Prompts, EMNLP 2022).

A library of frozen source prompts P_1..P_t (prompt-tuning prompts trained on other tasks, kept in
safetensors files) and a trainable target prompt P_T, all (n, H). Per instance, the input's word
embeddings X (B, T, H) are max-pooled over the unpadded tokens to x (B, H) and projected by a small
attention module, h = LayerNorm(W_up SiLU(W_down x)) (no biases, LayerNorm without affine, as the
authors' code trains only W_down and W_up); with max-pooled prompts p_j (H,), the weights over
[sources..., target] are a = softmax(p_j . h / T), T = H * e by default (the authors' 2087 for
T5-base). The prompt prepended to the input is P_T + sum_j a_j P_j (the sum includes P_T itself).

Multi-task: `tasks=("a", "b")` gives one target prompt per task, chosen by
`petlsearch.plugins.context.current_task()`; the attention module is shared by the tasks. Built
without `tasks` (as by name from the CLI), one target prompt serves every task of a mixture. The count
is trainable parameters only: tasks * n * H + 2 * H * r; the sources are buffers (frozen, not in the
module's state: they are read from the library files). Tooling: `save_source_prompt` turns a trained
prompt_tuning module into a library file; `Attempt.add_source` / `remove_source` edit the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError, did_you_mean
from petlsearch.plugins import context
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.mechanisms.tokens import TokenModule, input_sites, token_activations
from petlsearch.plugins.parts.prompts import INITS, init_from_vocab, max_prompt_length
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site

PROMPT_KEY = "prompt"
SHARED = "default"  # the one target prompt of a plugin built without task names, used by every task


def save_source_prompt(prompt: nn.Module | torch.Tensor, path: str | Path, task: str = "") -> Path:
    """Write a trained prompt (a prompt_tuning module, or an (n, H) tensor) as a source prompt file."""
    tensor = prompt.prompt if isinstance(prompt, nn.Module) else prompt
    if tensor.dim() != 2:
        raise PluginError(f"a source prompt is (length, hidden); got shape {tuple(tensor.shape)}")
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"task": task, "length": str(tensor.shape[0]), "hidden": str(tensor.shape[1])}
    save_file({PROMPT_KEY: tensor.detach().float().cpu().contiguous()}, str(path), metadata=meta)
    return path


def load_source_prompt(path: str | Path) -> torch.Tensor:
    """The (n, H) prompt of a source prompt file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if PROMPT_KEY not in tensors:
        raise PluginError(f"source prompt file '{path}' has no '{PROMPT_KEY}' tensor (keys: {sorted(tensors)})")
    return tensors[PROMPT_KEY]


class AttemptPrompt(TokenModule):
    level = "input"

    def __init__(self, site: Site, cfg: dict[str, Any], sources: torch.Tensor, tasks: Sequence[str] | None,
                 temperature: float | None) -> None:
        super().__init__(site)
        hidden, n, r = site.in_features, cfg["length"], cfg["bottleneck"]
        self.init = cfg["init"]
        self.shared = not tasks  # built without task names: one target prompt for every task of a mixture
        self.targets = nn.ParameterDict({t: nn.Parameter(torch.empty(n, hidden).uniform_(-0.5, 0.5))
                                         for t in tasks or (SHARED,)})
        self.register_buffer("sources", sources.clone(), persistent=False)  # (S, n, H), frozen
        self.down = nn.Linear(hidden, r, bias=False)
        self.up = nn.Linear(r, hidden, bias=False)
        self.temperature = temperature or hidden * math.e
        self.last_weights: torch.Tensor | None = None  # (B, S + 1) of the last forward, for inspection

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        if self.init == "vocab":
            for prompt in self.targets.values():
                init_from_vocab(prompt, model, self.site)
        super().hook(model, target)

    def target(self) -> torch.Tensor:
        task = context.current_task()
        if self.shared or (len(self.targets) == 1 and task is None):
            return next(iter(self.targets.values()))
        if task not in self.targets:
            raise PluginError(f"attempt: no target prompt for task {task!r}{did_you_mean(str(task), self.targets)}; "
                              f"tasks: {list(self.targets)} (set it with petlsearch.plugins.context.use(task=...))")
        return self.targets[task]

    def weights(self, embeds: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor) -> torch.Tensor:
        """Softmax weights (B, S + 1) of the prompts (S + 1, n, H) for the inputs (B, T, H)."""
        if mask is not None and mask.dim() == 2:
            embeds = embeds.masked_fill(~mask.bool()[..., None], torch.finfo(embeds.dtype).min)
        x = embeds.amax(dim=1)  # (B, H): max-pooled input
        h = F.layer_norm(self.up(F.silu(self.down(x))), x.shape[-1:])  # (B, H)
        keys = prompts.amax(dim=1)  # (S + 1, H): max-pooled prompts
        return torch.softmax(h @ keys.T / self.temperature, dim=-1)

    def tokens(self, embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        target = self.target()  # (n, H)
        prompts = torch.cat([self.sources.to(target.dtype), target[None]], dim=0)  # (S + 1, n, H)
        a = self.weights(embeds.to(target.dtype), mask, prompts)
        self.last_weights = a.detach()
        return target + torch.einsum("bs,snh->bnh", a, prompts)  # (B, n, H)


class Attempt(Plugin):
    name = "attempt"
    description = "Per-instance attention mixture of frozen source prompts and a target prompt"
    paper = ("Asai et al., ATTEMPT: Parameter-Efficient Multi-task Tuning via Attentional Mixtures of "
             "Soft Prompts, EMNLP 2022")
    kinds = ("tokens",)
    recipe = Recipe(lr=0.3, source=(
        "Asai et al. train the target prompt and attention at 0.3, as prompt tuning; on MiniLM in 100 steps "
        "0.1 and 0.3 stay at the majority class (python -m bench --only recipes)"))
    identity_at_init = False

    def __init__(self, sources: Sequence[str | Path] = (), tasks: Sequence[str] | None = None,
                 temperature: float | None = None, max_length: int = 100, max_bottleneck: int = 300) -> None:
        self.sources = sources
        self.tasks = tasks
        self.temperature = temperature
        self.max_length = max_length
        self.max_bottleneck = max_bottleneck

    # ------------------------------------------------------------------ the library
    def add_source(self, path: str | Path) -> None:
        """Add a source prompt file to the library (placements built later use it)."""
        prompt = load_source_prompt(path)
        library = self._library()
        if len(library) and tuple(prompt.shape) != tuple(library.shape[1:]):
            raise PluginError(f"source prompt '{path}' is {tuple(prompt.shape)}, the library's are "
                              f"{tuple(library.shape[1:])}; all prompts of a library share (length, hidden)")
        self.sources = (*self.sources, path)

    def remove_source(self, path: str | Path) -> None:
        """Remove a source prompt file from the library."""
        names = [str(p) for p in self.sources]
        if str(path) not in names:
            raise PluginError(f"'{path}' is not in the library{did_you_mean(str(path), names)}; library: {names}")
        self.sources = tuple(p for p in self.sources if str(p) != str(path))

    def _library(self) -> torch.Tensor:
        """(S, n, H): the source prompts, read once per library."""
        key = tuple(str(p) for p in self.sources)
        cached = self.__dict__.get("_loaded")
        if cached is None or cached[0] != key:
            prompts = [load_source_prompt(p) for p in key]
            shapes = {tuple(p.shape) for p in prompts}
            if len(shapes) > 1:
                raise PluginError(f"attempt: source prompts differ in shape {sorted(shapes)}: {list(key)}")
            cached = (key, torch.stack(prompts) if prompts else torch.empty(0, 0, 0))
            self.__dict__["_loaded"] = cached
        return cached[1]

    # ------------------------------------------------------------------ the plugin
    def sites(self, graph: Any) -> list[Site]:
        return input_sites(graph)

    def dims(self, site: Site) -> dict[str, Dim]:
        library = self._library()
        if len(library):  # the mixture sums prompts: the target has the sources' length
            low = high = int(library.shape[1])
        else:
            low, high = 1, max_prompt_length(site, self.max_length)
        r_high = max(1, min(self.max_bottleneck, 4 * site.in_features))
        return {
            "length": IntDim("length", default=min(max(20, low), high), low=low, high=high, log=True,
                             help="prompt length n (fixed by the source prompts when there are any)"),
            "bottleneck": IntDim("bottleneck", default=min(100, r_high), low=1, high=r_high, log=True,
                                 help="width r of the attention module's down-projection"),
            "init": ChoiceDim("init", default="vocab", choices=INITS, help="initialisation of the target prompt"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        return len(self.tasks or (None,)) * cfg["length"] * site.in_features + 2 * site.in_features * cfg["bottleneck"]

    def build(self, site: Site, cfg: dict[str, Any]) -> AttemptPrompt:
        library = self._library()
        if len(library) and library.shape[2] != site.in_features:
            raise PluginError(f"attempt: source prompts have hidden size {library.shape[2]}, site "
                              f"'{site.key}' has {site.in_features}; use prompts trained on this backbone")
        sources = library if len(library) else torch.empty(0, cfg["length"], site.in_features)
        return AttemptPrompt(site, cfg, sources, tuple(self.tasks or ()), self.temperature)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        return token_activations(site, cfg["length"], shape)

    def added_tokens(self, site: Site, cfg: dict[str, Any]) -> int:
        return cfg["length"]
