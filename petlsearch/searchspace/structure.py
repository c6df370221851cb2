"""Structure: the placements a search found, as a versioned YAML/JSON file that can be applied.

A structure records the backbone (name, family, parameter count, fingerprint), the budget, the
placements (site, role, layer, plugin, config) and the result (trainable params, scores, memory,
strategy, seed). Loading never executes code: `yaml.safe_load`, weights in safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from petlsearch.errors import StructureError
from petlsearch.files import write_text
from petlsearch.searchspace.bound import Applied, Bound, attach, bind, count_bound

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn

    from petlsearch.plugins.base import Plugin
    from petlsearch.searchspace.graph import ModelGraph

FORMAT_VERSION = 1
MAX_FILE_BYTES = 16 * 2**20


@dataclass
class Placement:
    """One module of a structure: `plugin` with `config` at site `site` (a Site.key). `tasks`
    None means shared by every task; a list makes it a per-task placement, active only while one
    of those tasks is current (multi-task training, petlsearch.plugins.context)."""

    site: str
    plugin: str
    config: dict[str, Any] = field(default_factory=dict)
    role: str = ""
    layer: int | None = None
    tasks: list[str] | None = None

    @property
    def candidate_key(self) -> str:
        """The search-space candidate this placement sizes: `site@plugin`."""
        return f"{self.site}@{self.plugin}"

    @property
    def key(self) -> str:
        """Unique in a structure: the candidate, and the tasks of a per-task placement."""
        return self.candidate_key + (f"[{','.join(self.tasks)}]" if self.tasks else "")


@dataclass
class Backbone:
    name: str = ""
    family: str = ""
    num_parameters: int = 0
    fingerprint: str = ""

    @classmethod
    def of(cls, graph: ModelGraph, name: str = "") -> Backbone:
        return cls(name or graph.info.get("model_type", ""), graph.family, graph.num_parameters(), graph.fingerprint())


@dataclass
class Structure:
    backbone: Backbone
    placements: list[Placement]
    budget: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    # how the structure was trained (steps, batch_size, lr_scale, head_lr, max_length, ...): the
    # settings `petlsearch train` repeats, the searched learning-rate scale among them
    train: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        data = {"petlsearch_structure": self.version, "backbone": asdict(self.backbone), "budget": self.budget,
                "placements": [_placement_dict(p) for p in self.placements]}
        if self.train:
            data["train"] = _plain(self.train)
        return {**data, "result": _plain(self.result)}

    def save(self, path: str | Path) -> Path:
        """Write YAML (or JSON for a .json path)."""
        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        return write_text(path, text)  # atomic: a crash never leaves half a structure file

    @classmethod
    def load(cls, path: str | Path) -> Structure:
        """Read and validate a structure file; any problem is a StructureError naming the field."""
        path = Path(path)
        if not path.is_file():
            raise StructureError(f"structure file {path} does not exist")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise StructureError(f"{path}: {path.stat().st_size} bytes is too large for a structure file")
        text = path.read_text(errors="replace")
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise StructureError(f"{path}: not valid YAML/JSON: {_yaml_problem(exc)}") from None
        return cls.from_dict(data, source=str(path), text=text)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", text: str | None = None) -> Structure:
        where = _Locator(source, text)
        if not isinstance(data, dict):
            raise StructureError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        version = data.get("petlsearch_structure")
        if version != FORMAT_VERSION:
            raise StructureError(f"{where('petlsearch_structure')}: 'petlsearch_structure' must be "
                                 f"{FORMAT_VERSION}, got {version!r}")
        bb = _mapping(data.get("backbone", {}), "backbone", where)
        backbone = Backbone(
            name=_typed(bb.get("name", ""), str, "backbone.name", where),
            family=_typed(bb.get("family", ""), str, "backbone.family", where),
            num_parameters=_typed(bb.get("num_parameters", 0), int, "backbone.num_parameters", where),
            fingerprint=_typed(bb.get("fingerprint", ""), str, "backbone.fingerprint", where),
        )
        raw = data.get("placements")
        if not isinstance(raw, list):
            raise StructureError(f"{where('placements')}: 'placements' must be a list")
        placements = [_read_placement(p, i, where) for i, p in enumerate(raw)]
        keys = [p.key for p in placements]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise StructureError(f"{source}: placement(s) {sorted(dup)} appear twice")
        budget = _mapping(data.get("budget", {}) or {}, "budget", where)
        result = _mapping(data.get("result", {}) or {}, "result", where)
        train = _mapping(data.get("train", {}) or {}, "train", where)
        for k, v in train.items():
            if not isinstance(v, (int, float, str, bool)) or not _is_plain(v):
                raise StructureError(f"{where('train', k)}: train.{k} has an unsupported value {v!r}")
        return cls(backbone, placements, budget, result, FORMAT_VERSION, train)

    # ------------------------------------------------------------------ model side
    def resolve(self, graph: ModelGraph, plugins: Mapping[str, Plugin],
                force: bool = False) -> list[tuple[Placement, Bound]]:
        """Each placement bound to its site on `graph` with the instance of the plugin it names (by
        name: `petlsearch.plugins.plugins_for(structure)` makes them); checks the backbone."""
        fp = graph.fingerprint()
        if self.backbone.fingerprint and self.backbone.fingerprint != fp and not force:
            raise StructureError(
                f"this structure was found for backbone '{self.backbone.name}' ({self.backbone.family}, "
                f"{self.backbone.num_parameters:,} parameters, {self.backbone.fingerprint}); the model is "
                f"{graph.family} with {graph.num_parameters():,} parameters ({fp}). Pass force=True "
                "(--force) to place it by site name on a backbone of the same shape")
        return bind(self.placements, graph, plugins)

    def count(self, graph: ModelGraph, plugins: Mapping[str, Plugin], force: bool = True) -> int:
        """Exact trainable parameters of the structure on `graph` (shared parameters counted once)."""
        return count_bound(b for _, b in self.resolve(graph, plugins, force=force))

    def apply(self, model: nn.Module, plugins: Mapping[str, Plugin], graph: ModelGraph | None = None,
              force: bool = False) -> Applied:
        """Attach every placement to `model` with `plugins` (by name) and return the handle to train,
        save, merge or detach."""
        from petlsearch.searchspace.graph import ModelGraph

        return attach(model, self.resolve(graph or ModelGraph.from_model(model), plugins, force=force))


class _Locator:
    """Turns a field path into 'file:line' using the YAML node tree, when the text is known."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        self.root = None
        if text is not None:
            try:
                self.root = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                self.root = None

    def __call__(self, *path: Any) -> str:
        node = self.root
        for part in path:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), node)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return f"{self.source}{line}"


def _mapping(value: Any, name: str, where: _Locator) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StructureError(f"{where(name)}: '{name}' must be a mapping, got {type(value).__name__}")
    return value


def _typed(value: Any, kind: type, name: str, where: _Locator) -> Any:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise StructureError(f"{where(*name.split('.'))}: '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _read_placement(raw: Any, i: int, where: _Locator) -> Placement:
    if not isinstance(raw, dict):
        raise StructureError(f"{where('placements', i)}: placements[{i}] must be a mapping")
    for key in ("site", "plugin"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise StructureError(f"{where('placements', i)}: placements[{i}].{key} must be a non-empty string")
    config = raw.get("config", {}) or {}
    if not isinstance(config, dict):
        raise StructureError(f"{where('placements', i, 'config')}: placements[{i}].config must be a mapping")
    for k, v in config.items():
        if not _is_plain(v):
            raise StructureError(f"{where('placements', i, 'config')}: placements[{i}].config.{k} has "
                                 f"an unsupported value {v!r}")
    layer = raw.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise StructureError(f"{where('placements', i)}: placements[{i}].layer must be an integer")
    tasks = raw.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks)):
        raise StructureError(f"{where('placements', i)}: placements[{i}].tasks must be a list of task names")
    return Placement(raw["site"], raw["plugin"], dict(config), str(raw.get("role", "")), layer, tasks)


def _is_plain(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) < 2**53
    if isinstance(v, (str, bool)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return len(v) <= 1024 and all(_is_plain(x) for x in v)
    return False


def _placement_dict(p: Placement) -> dict[str, Any]:
    d = {"site": p.site, "plugin": p.plugin, "role": p.role, "layer": p.layer, "config": _plain(p.config)}
    if p.tasks:
        d["tasks"] = list(p.tasks)
    return d


def _plain(value: Any) -> Any:
    """Tuples to lists, numpy/torch scalars to Python, so safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark else str(problem)
