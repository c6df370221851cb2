"""The six ways a module joins a model's forward pass, and the base every attached module shares.

- `OutputDelta`: out = f(x) + g * delta(x) on a module's own input (LoRA).
- `SequentialDelta`: h -> h + g * delta(h) after a sublayer (Houlsby adapters).
- `ParallelDelta`: out = f(x) + g * delta(x) with x the sublayer's input (parallel adapters).
- `Scale`: h -> h * (1 + g (l - 1)) on a module's output or input ((IA)^3).
- `WeightDelta`: W -> W + g * delta_weight() through torch's parametrize (BitFit, FISH, DSEE).
- `PETLModule`: the gate, install / uninstall and merge that the others, and the token, key/value
  prefix and side-network mechanisms (`mechanisms.tokens`, `mechanisms.kv_prefix`), build on.

Every mechanism is a forward hook or a parametrization: no model's source is edited, and
`uninstall` leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.searchspace.sites import Site

CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # the KV cache's name across transformers versions


def cached_length(kwargs: Any) -> int:
    """Positions already in a forward call's KV cache (0 without one): a step of incremental decoding
    continues from them. `kwargs` is the call's keyword arguments (anything with .get)."""
    cache = next((kwargs.get(n) for n in CACHE_ARGS if kwargs.get(n) is not None), None)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # the legacy tuple of (key, value) per layer


def trainable_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class PETLModule(nn.Module):
    """Base of every attached module: a gate, a host in the model, and install / uninstall.

    Subclasses pick a mechanism below (OutputDelta, SequentialDelta, ParallelDelta, Scale,
    WeightDelta) or override `install` for kinds that need more (tokens, prefixes, side networks).
    """

    on_weight: ClassVar[bool] = False  # changes a weight itself (WeightDelta), not what a module outputs

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self.gate: float | torch.Tensor = 1.0
        self.tasks: frozenset[str] | None = None  # per-task placement: acts only for these tasks
        self.plugin_name = ""
        self._handles: list[Any] = []
        self._hosts: list[nn.Module] = []  # a plain list, so the model is not registered as a child

    # -------------------------------------------------------------- gate
    @property
    def gate_off(self) -> bool:
        """True when the module must not act: its gate is exactly 0 (a float, or a 0-dim tensor:
        a clamped hard-concrete gate, whose gradient is 0 anyway), or it is a per-task placement
        and the current task (petlsearch.plugins.context) is not one of its tasks."""
        if self.tasks is not None:
            from petlsearch.plugins.context import current_task

            if current_task() not in self.tasks:
                return True
        g = self.gate
        if isinstance(g, torch.Tensor):
            return g.numel() == 1 and bool(g.detach() == 0)
        return g == 0.0

    def gated(self, delta: torch.Tensor) -> torch.Tensor:
        g = self.gate
        if isinstance(g, float) and g == 1.0:
            return delta
        return delta * g

    # -------------------------------------------------------------- life cycle
    @property
    def child_name(self) -> str:
        return f"petl_{self.plugin_name or type(self).__name__.lower()}"

    def install(self, model: nn.Module) -> None:
        """Register this module under the target module and hook it into the forward pass."""
        target = model.get_submodule(self.site.path)
        if hasattr(target, self.child_name):
            raise PluginError(f"site '{self.site.key}' already holds '{self.child_name}'")
        target.add_module(self.child_name, self)
        self._hosts.append(target)
        self.hook(model, target)

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        """Install forward hooks; called by `install` once the module is registered."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Remove every hook and the module itself: the model is exactly as before `install`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for host in self._hosts:
            if getattr(host, self.child_name, None) is self:
                delattr(host, self.child_name)
        self._hosts.clear()

    def trainable_count(self) -> int:
        """Trainable parameters this module adds on its own: sparse modules count only unmasked
        entries, and parameters shared between placements (children named `shared_*`) are left
        to the plugin's `shared_count`, so that they are counted once per structure."""
        shared = {id(p) for name, child in self.named_children() if name.startswith("shared_")
                  for p in child.parameters()}
        return sum(p.numel() for p in trainable_params(self) if id(p) not in shared)

    def merge(self) -> None:
        """Fold the module into the frozen weights and uninstall it (mergeable plugins only)."""
        raise PluginError(f"'{self.plugin_name}' modules cannot be merged into the weights")


class OutputDelta(PETLModule):
    """out = f(x) + gate * delta(x) on the target's own input x (LoRA-style)."""

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        self._handles.append(target.register_forward_hook(self._on_output))

    def _on_output(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.gate_off:
            return None
        return out + self.gated(self.delta(args[0]))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SequentialDelta(PETLModule):
    """h -> h + gate * delta(h) on the target's output (Houlsby-style, after a sublayer)."""

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        self._handles.append(target.register_forward_hook(self._on_output))

    def _on_output(self, _mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.gate_off:
            return None
        return out + self.gated(self.delta(out))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ParallelDelta(PETLModule):
    """out = f(x) + gate * delta(x), where x is the input of `site.source` (the sublayer's input)
    and f(x) the output of the target (the sublayer's last projection)."""

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        if not self.site.source:
            raise PluginError(f"parallel site '{self.site.key}' has no source module")
        source = model.get_submodule(self.site.source)
        self._handles.append(source.register_forward_pre_hook(self._on_input))
        self._handles.append(target.register_forward_hook(self._on_output))
        self._x: torch.Tensor | None = None

    def _on_input(self, _mod: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def _on_output(self, _mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        x, self._x = self._x, None
        if self.gate_off or x is None:
            return None
        return out + self.gated(self.delta(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Scale(PETLModule):
    """h -> h * l, on the target's output or (site extra where='input') its input; at gate g the
    vector is 1 + g (l - 1), so gate 0 is the identity."""

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        if self.site.get("where", "output") == "input":
            self._handles.append(target.register_forward_pre_hook(self._on_input))
        else:
            self._handles.append(target.register_forward_hook(self._on_output))

    def effective(self) -> torch.Tensor:
        scale = self.scale()
        g = self.gate
        if isinstance(g, float) and g == 1.0:
            return scale
        return 1 + g * (scale - 1)

    def _on_input(self, _mod: nn.Module, args: tuple) -> tuple | None:
        if self.gate_off:
            return None
        return (args[0] * self.effective(), *args[1:])

    def _on_output(self, _mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.gate_off:
            return None
        return out * self.effective()

    def scale(self) -> torch.Tensor:
        raise NotImplementedError


class WeightDelta(PETLModule):
    """W -> W + gate * delta_weight() on the parameter `site.param` of the target, through
    `torch.nn.utils.parametrize`: one matmul with the effective weight, any layer type."""

    on_weight: ClassVar[bool] = True

    def install(self, model: nn.Module) -> None:
        from torch.nn.utils import parametrize

        target = model.get_submodule(self.site.path)
        name = self.site.param or "weight"
        if getattr(target, name, None) is None:
            raise PluginError(f"site '{self.site.key}': {type(target).__name__} has no parameter '{name}'")
        # a tied parameter (GPT-2's wte / lm_head) changes everywhere it is used, so that the forward
        # matches merging the update into it
        param = stored_parameter(target, name)
        tied = [m for m in model.modules() if m is not target and stored_parameter(m, name) is param]
        self._param_orders: dict[int, list[str]] = {}
        for host in [target, *tied]:
            self._param_orders[id(host)] = list(host._parameters)  # torch re-adds the weight last on removal
            parametrize.register_parametrization(host, name, _Parametrization(self), unsafe=True)
            self._hosts.append(host)

    def uninstall(self) -> None:
        from torch.nn.utils import parametrize

        name = self.site.param or "weight"
        for target in self._hosts:
            if not parametrize.is_parametrized(target, name):
                continue
            others = [p.owner for p in target.parametrizations[name] if p.owner is not self]
            parametrize.remove_parametrizations(target, name, leave_parametrized=False)
            for owner in others:  # torch removes all of a tensor's parametrizations at once
                parametrize.register_parametrization(target, name, _Parametrization(owner), unsafe=True)
            _restore_order(target, getattr(self, "_param_orders", {}).get(id(target), []))
        self._hosts.clear()

    def delta_weight(self) -> torch.Tensor:
        """The update, shaped like the parameter it changes."""
        raise NotImplementedError

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The parameter as the forward sees it (gate not 0); sparse updates override this to
        touch only their entries instead of adding a dense delta."""
        return weight + self.gated(self.delta_weight())

    def merge(self) -> None:
        from torch.nn.utils import parametrize

        name = self.site.param or "weight"
        target = self._hosts[0]
        with torch.no_grad():
            delta = self.gated(self.delta_weight()).detach()
        self.uninstall()
        if parametrize.is_parametrized(target, name):
            target.parametrizations[name].original.data += delta
        else:
            getattr(target, name).data += delta


def stored_parameter(module: nn.Module, name: str) -> Any:
    """The stored parameter `name` of `module` (under any parametrization), or None: what a merge
    adds to, so that another placement's parametrization of the same weight stays on top of it."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return module._parameters.get(name)


def _restore_order(module: nn.Module, order: list[str]) -> None:
    """Put `module`'s parameters back in their original order, so that named_parameters() (and
    optimizers' and state dicts' order) is exactly as before the parametrization."""
    params = module._parameters
    names = [n for n in order if n in params] + [n for n in params if n not in order]
    items = [(n, params[n]) for n in names]
    params.clear()
    params.update(items)


class _Parametrization(nn.Module):
    """Adapts a WeightDelta to torch's parametrize API without registering it twice."""

    def __init__(self, owner: WeightDelta) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.owner.gate_off:
            return weight
        return self.owner.effective_weight(weight)
