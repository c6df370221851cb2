"""Scale: building the model graph and the search space, from MiniLM to Llama-2-7B, on the meta device.

Every model is built from its config on the meta device (shapes, no weights), so a 7B model costs
no memory. For each: the model graph's construction time (median of repeats, no tracing) and its
peak Python memory (tracemalloc, a separate run: tracing slows Python down); the search space of
the default plugins (LoRA, adapters, parallel adapters, BitFit, IA3); and sampling 1,000
budget-feasible structures (budget 0.1%; median of repeats). Targets: MiniLM graph < 100 ms;
7B graph < 3 s and < 500 MB; 7B space < 5 s; 1,000 samples < 1 s. A second table shows how the
figures grow with the number of layers (Llama-2-7B widths) and a third with the number of plugins.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from bench.common import Options, Report, Table, Target, mib, peak_python_memory, timed
from bench.common import median as med

log = logging.getLogger(__name__)
NAME = "scale"
TITLE = "Scale: graph and search-space construction"
PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")
BUDGET = "0.1%"


def configs(quick: bool) -> dict[str, Callable[[], Any]]:
    """name -> config factory; transformers' configs, so nothing is downloaded."""
    from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig, T5Config

    from petlsearch.runners import data as D

    def llama(layers: int = 32) -> LlamaConfig:
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)

    out: dict[str, Callable[[], Any]] = {"all-MiniLM-L6-v2": lambda: AutoConfig.from_pretrained(D.minilm_path())}
    if quick:
        out["Llama-2-7B widths, 2 layers"] = lambda: llama(2)
        return out
    out.update({
        "BERT-base": lambda: BertConfig(),
        "GPT-2 (124M)": lambda: GPT2Config(),
        "T5-base": lambda: T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64),
        "Llama-2-7B": llama,
    })
    return out


def meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config)


def measure(config: Any, repeats: int, samples: int, plugins: tuple[str, ...] = PLUGINS) -> dict[str, Any]:
    """Times (medians of `repeats`), graph peak memory, candidates and sampling time of one config."""
    from petlsearch.plugins import create_plugins
    from petlsearch.searchspace.budget import Budget
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

    t_model, model = timed(lambda: meta_model(config))
    graph_times = [timed(lambda: ModelGraph.from_model(model))[0] for _ in range(repeats)]
    graph_peak, graph = peak_python_memory(lambda: ModelGraph.from_model(model))
    space_times = [timed(lambda: SearchSpace.from_graph(graph, create_plugins(plugins)))[0] for _ in range(repeats)]
    space_peak, space = peak_python_memory(lambda: SearchSpace.from_graph(graph, create_plugins(plugins)))
    budget = Budget.parse(BUDGET)
    sample_times = []
    for r in range(repeats):
        rng = random.Random(r)
        t, structures = timed(lambda: [space.sample(rng, budget) for _ in range(samples)])
        sample_times.append(t)
    t_sample = med(sample_times)
    limit = space.bind(budget).limit
    over = sum(space.count(s) > limit for s in structures[:100])  # spot check: all must fit
    if over:
        raise AssertionError(f"{over} of 100 sampled structures exceed the budget")
    return {"params": graph.num_parameters(), "nodes": len(graph.nodes), "layers": len(graph.blocks),
            "model_s": t_model, "graph_s": med(graph_times), "graph_mb": mib(graph_peak),
            "space_s": med(space_times), "space_mb": mib(space_peak), "candidates": len(space),
            "log10_structures": space.size().log10_structures, "sample_s": t_sample, "samples": samples,
            "mean_placements": sum(map(len, structures)) / max(1, len(structures))}


def growth(opts: Options, repeats: int, samples: int) -> Table:
    """The same figures over Llama-2-7B-wide models of 1 ... 32 layers."""
    from transformers import LlamaConfig

    table = Table("Growth with layers (Llama-2-7B widths: hidden 4096, FFN 11008, 32 heads; default plugins)",
                  ["layers", "params", "graph nodes", "graph ms", "graph MB", "candidates", "space ms",
                   f"{samples} samples ms"])
    for layers in opts.pick((2, 4), (2, 4, 8, 16, 32)):  # blocks are found in lists of >= 2
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=32)
        r = measure(cfg, repeats, samples)
        table.add(layers, r["params"], r["nodes"], r["graph_s"] * 1e3, r["graph_mb"], r["candidates"],
                  r["space_s"] * 1e3, r["sample_s"] * 1e3)
    return table


def by_plugins(config: Any, repeats: int) -> Table:
    """Space construction on one model as plugins are added (every registered plugin that has sites)."""
    from petlsearch.plugins import create_plugin, create_plugins, list_plugins
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace

    graph = ModelGraph.from_model(meta_model(config))
    usable = []
    for name in list_plugins():
        try:
            if create_plugin(name).sites(graph):
                usable.append(name)
        except Exception as exc:  # a plugin that cannot read this graph is reported, not fatal
            log.warning("scale: plugin %s skipped: %s", name, exc)
    table = Table(f"Growth with plugins ({graph.info['model_type']}, {graph.num_parameters():,} parameters)",
                  ["plugins", "added", "candidates", "space ms", "log10 structures"])
    for k in range(1, len(usable) + 1):
        times, space = [], None
        for _ in range(repeats):
            t, space = timed(lambda: SearchSpace.from_graph(graph, create_plugins(usable[:k])))
            times.append(t)
        table.add(k, usable[k - 1], len(space), med(times) * 1e3, space.size().log10_structures)
    return table


def run(opts: Options) -> Report:
    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    repeats = opts.pick(1, 5, opts.repeats)
    samples = opts.pick(100, 1000)
    main = Table(f"Graph and space per model (meta device; default plugins; budget {BUDGET}; medians of {repeats})",
                 ["model", "params", "layers", "graph ms", "graph MB", "candidates", "space ms", "space MB",
                  "log10 structures", f"{samples} samples ms", "placements / sample"])
    results = {}
    for name, factory in configs(opts.quick).items():
        r = results[name] = measure(factory(), repeats, samples)
        main.add(name, r["params"], r["layers"], r["graph_s"] * 1e3, r["graph_mb"], r["candidates"],
                 r["space_s"] * 1e3, r["space_mb"], r["log10_structures"], r["sample_s"] * 1e3, r["mean_placements"])
    report.tables += [main, growth(opts, repeats, samples)]
    big = results.get("Llama-2-7B") or results[list(results)[-1]]
    label = "7B" if "Llama-2-7B" in results else "Llama 2-layer (quick)"
    mini = results["all-MiniLM-L6-v2"]
    report.targets += [
        Target("MiniLM graph", mini["graph_s"] * 1e3, 100, "<", " ms"),
        Target(f"{label} graph", big["graph_s"], 3, "<", " s"),
        Target(f"{label} graph peak Python memory", big["graph_mb"], 500, "<", " MB"),
        Target(f"{label} space, default plugins", big["space_s"], 5, "<", " s"),
        Target(f"{label}: {samples} budget-feasible samples", big["sample_s"], 1.0 * samples / 1000, "<", " s"),
    ]
    if not opts.quick:
        from transformers import AutoConfig

        from petlsearch.runners import data as D

        report.tables.append(by_plugins(AutoConfig.from_pretrained(D.minilm_path()), repeats))
    report.notes.append("Peak memory is Python's (tracemalloc): on the meta device no tensor storage exists.")
    report.data = {"models": results}
    return report
