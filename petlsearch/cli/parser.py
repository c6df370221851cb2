"""The command line's parser: every subcommand, its flags and their help."""

from __future__ import annotations

import argparse

from petlsearch import __version__
from petlsearch.cli.commands import cmd_export, cmd_graph, cmd_plugins, cmd_search, cmd_show, cmd_train


def _column_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text", help="text column of a csv:/jsonl: task (default: text)")
    p.add_argument("--label-column", default="label", help="label column of a csv:/jsonl: task (default: label)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", help="learning rate: a scale of every plugin's recipe ('3x', '0.3x'), or one absolute "
                   "rate for every module ('1e-3'); given, the search does not search it")
    p.add_argument("--head-lr", help="learning rate of the new task head (default: the recipes', else 1e-2); "
                   "search --head-lr auto: the best of the head alone at 3e-3, 1e-2, 3e-2 and 1e-1 first")
    p.add_argument("--batch-size", type=int, help="examples per training step (default 16)")
    p.add_argument("--max-length", type=int, help="tokens per text example (default 64)")
    p.add_argument("--device", help="auto (default: CUDA when there is one), cpu, cuda, cuda:N, mps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petlsearch", description="Search the best parameter-efficient "
                                     "fine-tuning structure for a frozen pretrained model under a budget.")
    parser.add_argument("--version", action="version", version=f"petlsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search a structure under a budget, retrain it, write a run folder")
    parser.set_defaults(search_parser=s)
    s.add_argument("--budget", default="0.01%", help="trainable parameters: '0.01%%', '1e-4', '25k', '1.2M'")
    s.add_argument("--memory-budget", help="training memory: '2GiB', '500MB'")
    s.add_argument("--include-head", action="store_true", help="count the task head against the budget")
    s.add_argument("--strategy", default="s3pet", help="s3pet (default) | optuna | ray | random | module:Class")
    s.add_argument("--model", help="minilm (default), efficientnet-lite0, a local folder, or a hub name")
    s.add_argument("--task", default="rotten_tomatoes", help="rotten_tomatoes, fashion_mnist, digits, csv:PATH, "
                   "jsonl:PATH, images:DIR, hub:NAME, lm:FILE, multi:TASK+TASK")
    _column_flags(s)
    s.add_argument("--plugins", help="comma-separated plugin names (default: lora,adapter,parallel_adapter,bitfit,ia3)")
    s.add_argument("--plugin", action="append", help="extra plugin as package.module:Class (repeatable)")
    s.add_argument("--roles", help="only sites of these roles, e.g. attn.q,attn.v,ffn")
    s.add_argument("--layers", help="only these layers, e.g. 0,1,2")
    s.add_argument("--trials", type=int, default=4, help="structures to evaluate (s3pet: its supernet trains "
                   "for trials x steps)")
    s.add_argument("--steps", type=int, help="training steps per trial")
    s.add_argument("--final-steps", type=int, help="training steps of the final retraining")
    s.add_argument("--timeout", type=float, help="stop proposing trials after this many seconds")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="strategy option, e.g. objectives=[score,params] (optuna), steps=300 (s3pet)")
    s.add_argument("--address", help="ray: address of an existing Ray cluster (default: a local Ray)")
    s.add_argument("--seed", type=int, default=0)
    _training_flags(s)
    s.add_argument("--out", default="runs/latest", help="run folder")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--config", help="YAML file of search options under the flags' names (a run folder's "
                   "run.yaml repeats that run); flags given as well override it")
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="retrain and evaluate a structure file; save its weights")
    t.add_argument("structure")
    t.add_argument("--model")
    t.add_argument("--task", default="rotten_tomatoes")
    _column_flags(t)
    t.add_argument("--steps", type=int, help="training steps (default: the structure's train section, else 250)")
    t.add_argument("--seed", type=int, default=0)
    _training_flags(t)
    t.add_argument("--weights", help="where to write the trained weights (.safetensors)")
    t.add_argument("--force", action="store_true", help="apply to a backbone with another fingerprint")
    t.add_argument("--plugin", action="append", help="extra plugin as package.module:Class")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("graph", help="show a model's sites, roles and layers")
    g.add_argument("model", nargs="?", default="minilm")
    g.add_argument("--roles", help="only these roles (prefixes)")
    g.add_argument("--png", help="also draw the graph to this PNG file")
    g.set_defaults(func=cmd_graph)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--plugin", action="append", help="also load package.module:Class")
    p.set_defaults(func=cmd_plugins)

    sh = sub.add_parser("show", help="summarise a structure file")
    sh.add_argument("structure")
    sh.add_argument("--plugin", action="append", help="extra plugin as package.module:Class")
    sh.set_defaults(func=cmd_show)

    e = sub.add_parser("export", help="convert a structure: --to merged | peft | yaml | json")
    e.add_argument("structure")
    e.add_argument("--to", choices=("merged", "peft", "yaml", "json"), required=True,
                   help="merged: a Hugging Face model folder with the mergeable placements folded in")
    e.add_argument("--partial", action="store_true", help="merged: also write the placements that cannot "
                   "merge as a structure file (default: refuse them)")
    e.add_argument("--task", default="rotten_tomatoes", help="merged: the task the structure was trained on "
                   "(its head and label count)")
    _column_flags(e)
    e.add_argument("--plugin", action="append", help="extra plugin as package.module:Class")
    e.add_argument("--weights", help="trained weights (.safetensors; default: next to the structure)")
    e.add_argument("--model", help="backbone to export for (default: the structure's)")
    e.add_argument("--out", help="output file or folder")
    e.set_defaults(func=cmd_export)
    return parser
