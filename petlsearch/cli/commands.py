"""The subcommands (`cmd_<name>(args) -> exit code`) and the small parsers of their flag values. Each
imports the heavy libraries it needs when it runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from petlsearch.cli.config import run_config
from petlsearch.errors import PetlsearchError

log = logging.getLogger("petlsearch")


def _console(stdout: bool = False) -> Any:
    """Messages and progress go to stderr; tables and results (what a script reads) to stdout."""

    from rich.console import Console

    stream = sys.stdout if stdout else sys.stderr
    return Console(stderr=not stdout, width=None if stream.isatty() else 200)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """KEY=VALUE strategy options; values are read as YAML scalars/lists (safe_load: no code)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise PetlsearchError(f"strategy option {pair!r} must look like key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load_extra_plugins(specs: Sequence[str] | None) -> list[str]:
    from petlsearch.plugins.registry import load_spec

    return [load_spec(s).name for s in specs or []]


def _load_structure(path: str, plugin_specs: Sequence[str] | None) -> Any:
    """A structure file, read and checked: every plugin it names is installed (or given as --plugin)."""
    from petlsearch.plugins.registry import get_plugin_class
    from petlsearch.searchspace.structure import Structure

    _load_extra_plugins(plugin_specs)
    structure = Structure.load(path)
    for name in sorted({p.plugin for p in structure.placements}):
        try:
            get_plugin_class(name)
        except PetlsearchError as exc:
            raise PetlsearchError(f"{path}: {exc}. Install the package that provides plugin '{name}' (its "
                                  "'petlsearch.plugins' entry point), or pass --plugin package.module:Class") from None
    return structure


# ---------------------------------------------------------------------------- commands
def _positive(text: str) -> float | None:
    """`text` as a positive finite number; None when it is not one."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if 0 < number < float("inf") else None


def _rate(text: str | None) -> dict[str, float]:
    """--lr: '3x' scales every plugin's recipe, '1e-3' is one absolute rate for every module."""
    if text is None:
        return {}
    value = text.strip().lower()
    scale = value.endswith("x")
    number = _positive(value[:-1] if scale else value)
    if number is None:
        raise PetlsearchError(f"cannot read the learning rate {text!r}; use a scale of the plugins' recipes "
                              "('3x', '0.5x') or one absolute rate ('1e-3')")
    return {"lr_scale": number} if scale else {"lr": number, "lr_scale": 1.0}


def _training(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the training flags set (only those given)."""
    out: dict[str, Any] = dict(_rate(args.lr))
    if args.head_lr is not None and not auto_head_lr(args):
        out["head_lr"] = _positive(args.head_lr)
        if out["head_lr"] is None:
            raise PetlsearchError(f"--head-lr must be a positive rate or 'auto', got {args.head_lr!r}")
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise PetlsearchError(f"--batch-size must be a positive integer, got {args.batch_size}")
        out["batch_size"] = args.batch_size
    if args.device is not None:
        out["device"] = _device(args.device)
    return out


def auto_head_lr(args: argparse.Namespace) -> bool:
    """`--head-lr auto`: the search picks the head's rate first (`petlsearch train` takes a number)."""
    auto = str(args.head_lr).strip().lower() == "auto"
    if auto and args.command != "search":
        raise PetlsearchError("--head-lr auto is a search option; give `petlsearch train` a rate, e.g. the "
                              "head_lr in the structure's train section")
    return auto


def _device(name: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise PetlsearchError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def _max_length(args: argparse.Namespace) -> int | None:
    if args.max_length is not None and args.max_length < 2:
        raise PetlsearchError(f"--max-length must be at least 2 tokens, got {args.max_length}")
    return args.max_length


def cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.progress import Progress

    from petlsearch.runners.search import DEFAULT_PLUGINS, FINAL_FIDELITY, SEARCH_FIDELITY, search

    console = _console()
    plugins = (_csv(args.plugins) or list(DEFAULT_PLUGINS)) + _load_extra_plugins(args.plugin)
    options = _options(args.option)
    if args.address:
        options["address"] = args.address
    training = _training(args)
    fidelity = replace(SEARCH_FIDELITY, steps=args.steps or SEARCH_FIDELITY.steps, seed=args.seed, **training)
    final = replace(FINAL_FIDELITY, steps=args.final_steps or FINAL_FIDELITY.steps, seed=args.seed, **training)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"{args.strategy} search", total=args.trials if args.strategy != "s3pet" else None)
        final_bar: list[Any] = []

        def say(msg: str) -> None:
            console.print(f"[yellow]{msg}[/yellow]" if msg.startswith("warning: ") else msg, highlight=False)
            if msg.startswith("trial "):
                progress.advance(bar)

        def final_step(advance: int = 1) -> None:
            if not final_bar:
                progress.update(bar, visible=False)
                final_bar.append(progress.add_task("final training", total=final.steps))
            progress.advance(final_bar[0], advance)

        result = search(model=args.model, task=args.task, budget=args.budget, memory_budget=args.memory_budget,
                        strategy=args.strategy, plugins=plugins, trials=args.trials, out=args.out,
                        resume=args.resume, seed=args.seed, include_head=args.include_head,
                        roles=_csv(args.roles), layers=[int(x) for x in _csv(args.layers) or []] or None,
                        fidelity=fidelity, final=final, timeout=args.timeout, progress=say,
                        strategy_options=options, on_final_step=final_step, max_length=_max_length(args),
                        run_config=run_config(args), text_column=args.text_column,
                        label_column=args.label_column, auto_head_lr=auto_head_lr(args))
    res = result.structure.result
    console.print(f"[bold]best structure[/bold]: {len(result.structure.placements)} placements, "
                  f"{res['trainable_params']:,} trainable parameters "
                  f"({100 * res['trainable_params'] / res['backbone_params']:.4f}% of the backbone, "
                  f"+{res['head_params']:,} head); test {res['metric']} {res['test'].get(res['metric'], float('nan')):.4f}")
    if result.out_dir:
        console.print(f"run folder: {result.out_dir} (structure.yaml, weights.safetensors, report.json, run.yaml, "
                      "*.png)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields, replace

    from petlsearch.plugins.registry import plugins_for
    from petlsearch.runners.search import FINAL_FIDELITY
    from petlsearch.runners.tasks import get_task
    from petlsearch.runners.trainer import TrainConfig
    from petlsearch.runners.trial import run_trial
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.smoke import NOTICE, smoke

    console = _console()
    if smoke():
        console.print(f"[yellow]warning: {NOTICE}[/yellow]", highlight=False)
    structure = _load_structure(args.structure, args.plugin)
    recorded = dict(structure.train)  # how the search trained it: the learning-rate scale it found, ...
    recorded_length = recorded.pop("max_length", None)  # a task setting, not a TrainConfig field
    max_length = _max_length(args) or recorded_length
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise PetlsearchError(f"{args.structure}: train section has unknown setting(s) {unknown}; "
                              f"valid: {sorted(known)}")
    task = get_task(args.task, args.model, seed=args.seed, text_column=args.text_column,
                    label_column=args.label_column, **({"max_length": max_length} if max_length else {}))
    graph = ModelGraph.from_model(task.make_model())
    plugins = plugins_for(structure)
    structure.resolve(graph, plugins, force=args.force)  # fail early, naming the site or the backbone
    cfg = replace(FINAL_FIDELITY, **recorded)
    cfg = replace(cfg, seed=args.seed, **({"steps": args.steps} if args.steps else {}), **_training(args))
    out = args.weights or str(args.structure).rsplit(".", 1)[0] + ".safetensors"
    outcome = run_trial(task, structure.placements, plugins, cfg, test=True, weights_path=out)
    console.print(f"{outcome.params:,} trainable parameters (+{outcome.head_params:,} head); "
                  f"val {task.metric} {outcome.metrics[task.metric]:.4f}; test {task.metric} "
                  f"{outcome.test[task.metric]:.4f}; "
                  f"weights: {out}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from rich.table import Table

    from petlsearch.searchspace.graph import ModelGraph

    console = _console(stdout=True)
    from petlsearch.runners.tasks import build_model

    graph = ModelGraph.from_model(build_model(args.model))
    table = Table(title=f"{args.model}: {graph.family}, {graph.num_parameters():,} backbone parameters")
    columns = ("name", "role", "from", "layer", "type", "in", "out", "params")
    for col in columns:
        table.add_column(col)
    rows = graph.summary_rows()
    for row in rows:
        if args.roles and not any(str(row["role"]).startswith(r) for r in _csv(args.roles)):
            continue
        table.add_row(*(str(row[c] if row[c] is not None else "") for c in columns))
    console.print(table)
    found = sum(row["from"] == "structure" for row in rows)
    if found:
        console.print(f"{found} role(s) from the model's structure (shapes and order of each block's Linear "
                      "layers), where no name rule knew the module: 'from' says structure")
    for stack, info in graph.info["stacks"].items():
        console.print(f"stack {stack}: {info['layers']} layers, hidden {info['hidden_size']}, {info['num_heads']} heads")
    if args.png:
        from petlsearch.runners.report import graph_picture

        console.print(f"picture: {graph_picture(graph, args.png)}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.table import Table

    from petlsearch.plugins.registry import list_plugins, load_all

    console = _console(stdout=True)
    _load_extra_plugins(args.plugin)
    loaded = load_all()
    table = Table(title="installed plugins")
    for col in ("name", "kinds", "lr", "description", "paper"):
        table.add_column(col, overflow="fold")
    for name in list_plugins():
        cls = loaded.get(name)
        if cls is None:
            table.add_row(name, "-", "", "[red]failed to load (see the warning above)[/red]", "")
        else:
            table.add_row(name, ",".join(cls.kinds), f"{cls.recipe.lr:g}", cls.description, cls.paper)
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    console = _console(stdout=True)
    s = _load_structure(args.structure, args.plugin)
    res = s.result
    console.print(f"backbone: {s.backbone.name} ({s.backbone.family}, {s.backbone.num_parameters:,} parameters)")
    if s.budget:
        console.print(f"budget: {s.budget.get('spec') or s.budget}")
    if res:
        console.print(f"trainable parameters: {res.get('trainable_params', '?'):,}; test: {res.get('test', {})}; "
                      f"strategy: {res.get('strategy', '?')}, seed {res.get('seed', '?')}")
    if res.get("baselines"):
        verdict = "beats" if res.get("beats_baselines") else "does NOT beat"
        console.print(f"{verdict} the trivial baselines: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}"
                                                                     for k, v in res["baselines"].items()))
    if s.train:
        console.print("trained with: " + ", ".join(f"{k}={v}" for k, v in s.train.items())
                      + " (petlsearch train repeats it)")
    table = Table(title=f"{len(s.placements)} placements")
    for col in ("site", "plugin", "config"):
        table.add_column(col)
    for p in s.placements:
        table.add_row(p.site, p.plugin, ", ".join(f"{k}={v}" for k, v in p.config.items()))
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    s = _load_structure(args.structure, args.plugin)
    if args.to in ("yaml", "json"):
        out = args.out or str(args.structure).rsplit(".", 1)[0] + f".{args.to}"
        s.save(out)
    elif args.to == "merged":
        from petlsearch.runners.export import export_merged
        from petlsearch.runners.tasks import get_task

        task = get_task(args.task, args.model or s.backbone.name, text_column=args.text_column,
                        label_column=args.label_column, **({"max_length": s.train["max_length"]}
                                                            if "max_length" in s.train else {}))
        out = export_merged(s, args.structure, task, args.weights, args.out, partial=args.partial)
    else:
        from petlsearch.runners.export import export_peft

        out = export_peft(s, args.structure, args.weights, args.out, model=args.model)
    _console().print(f"wrote {out}")
    return 0
