"""Search: accuracy vs budget for each strategy at equal compute, beside hand-made structures.

For each budget (0.01%, 0.1%, 1% of the backbone) and strategy (random, optuna, s3pet, ray) the
whole pipeline (petlsearch.runners.search.search) searches the default space (LoRA, adapters,
parallel adapters, BitFit, IA3) on MiniLM / Rotten Tomatoes and retrains the found structure;
every strategy gets the same number of training steps (trials x steps per trial; S3PET's
supernet gets (trials - 1) x steps and its final structure one trial), each plugin's modules at
its recipe (`Plugin.recipe`), as the CLI trains them. Beside them: the best of
the hand-made structures that fit each budget (LoRA on q and v, LoRA on every projection,
Houlsby adapters, IA3, BitFit, each at the largest uniform size that fits, in the top layers when
the whole model does not), picked on the validation split, and full fine-tuning. S3PET, the
hand-made design picked and full fine-tuning run 3 seeds. Reported: test
accuracy, trainable parameters, and the search cost (search wall time over one training run of
the final structure); a Pareto plot of accuracy against parameters. Full mode: 6 trials of 20
steps per search and a final run of 100 steps at batch 16 (the zoo's), about 40 minutes on 2 CPU
cores; finished searches and runs are kept in results/raw/search-runs.jsonl, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import methods as M
from bench.common import Options, Report, RunLog, Table, Target, plt, std
from bench.tasks import minilm_task, tiny_task

log = logging.getLogger(__name__)
NAME = "search"
TITLE = "Search: accuracy vs budget per strategy at equal compute"
PLUGINS = ("lora", "adapter", "parallel_adapter", "bitfit", "ia3")
HAND_MADE = (("LoRA q,v", "lora", ("attn.q", "attn.v")), ("BitFit", "bitfit", None),
             ("Houlsby adapter", "adapter", None), ("IA3", "ia3", None))
# S3PET, the hand-made design picked on validation and full fine-tuning run 3 seeds: one seed's
# figures move by 1-2 points, as much as the differences between them that the targets read
COMPARED_SEEDS = 3
COMPARED = ("s3pet", "hand-made", "full")  # full fine-tuning too: the 99% target reads its mean
# Ray runs at the headline budget only: it runs Optuna's sampler through Ray Tune, so at
# the other budgets it repeats Optuna's structures
TARGET_BUDGET = "0.1%"


def recipes() -> dict[str, float]:
    """Each plugin's recipe rate: part of a run's key, so that a new recipe is a new run."""
    from petlsearch.plugins import create_plugin

    return {name: create_plugin(name).recipe.lr for name in PLUGINS}


def strategies(quick: bool, budget: str) -> list[str]:
    if quick:
        return ["random", "s3pet"]
    import importlib.util

    ray = budget == TARGET_BUDGET and importlib.util.find_spec("ray") is not None
    return ["random", "optuna", "s3pet"] + (["ray"] if ray else [])


def seeds_of(opts: Options, method: str) -> int:
    """Seeds of a search (`method` = its strategy), of the hand-made design picked ("hand-made") or
    of full fine-tuning ("full")."""
    return opts.pick(1, COMPARED_SEEDS if method in COMPARED else 1, opts.seeds)


def strategy_defaults(strategy: str) -> dict[str, Any]:
    """What a run-log key needs beyond the budget and fidelities: S3PET's candidate sizes and budget
    warm-up (a search at another setting of the strategy's defaults is another run)."""
    from petlsearch.strategies.s3pet import S3PETSearch

    default = S3PETSearch()
    return {"s3pet_sizes": default.sizes, "s3pet_warmup": default.warmup} if strategy == "s3pet" else {}


def fit_design(space: Any, plugin: str, roles: Any, limit: int) -> list[Any] | None:
    """The largest uniform size of `plugin` on `roles` that fits `limit`, in as many top layers as fit."""
    from petlsearch.searchspace.dims import IntDim

    cands = [c for c in space.candidates if c.plugin == plugin
             and (roles is None or c.site.role in roles) and c.site.layer is not None]
    layers = sorted({c.site.layer for c in cands}, reverse=True)
    for n in range(len(layers), 0, -1):
        chosen = [c for c in cands if c.site.layer in layers[:n]]
        size_dim = next((k for k, d in chosen[0].dims.items() if isinstance(d, IntDim)), None) if chosen else None
        high = min((c.dims[size_dim].high for c in chosen), default=1) if size_dim else 1
        sizes = sorted({2 ** i for i in range(high.bit_length()) if 2 ** i <= high} | {1}, reverse=True)
        for size in sizes if size_dim else [None]:
            placements = [c.placement(space.plugins[plugin].config(c.site, {size_dim: size} if size_dim else {}))
                          for c in chosen]
            if space.count(placements) <= limit:
                return placements
    return None


def hand_made_work(task: Any, space: Any, budget: str, final: Any, designs: Any,
                   seed: int = 0) -> list[tuple[str, Any]]:
    """(run-log key, compute) of each design that fits `budget`, trained at the final fidelity
    with `seed`."""
    from petlsearch.runners.trial import run_trial
    from petlsearch.searchspace.budget import Budget

    limit = space.bind(Budget.parse(budget)).limit
    cfg = replace(final, seed=seed)
    work = []
    for label, plugin, roles in designs:
        placements = fit_design(space, plugin, roles, limit)
        if placements is not None:
            work.append((RunLog.key(hand_made=label, budget=budget, recipes=recipes(), **cfg.to_dict()),
                         lambda label=label, placements=placements: _hand_made_row(
                             label, run_trial(task, placements, space.plugins, cfg, test=True))))
    return work


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one configuration over seeds: mean validation and test accuracy, the test spread."""
    tests = [r["test"] for r in runs]
    return {"val": statistics.fmean(r["val"] for r in runs), "test": statistics.fmean(tests), "std": std(tests),
            "seeds": len(runs), "tests": tests}


def design_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One hand-made design over seeds."""
    return {"design": runs[0]["design"], "params": runs[0]["params"], **over_seeds(runs)}


def full_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Full fine-tuning over seeds, its step time the mean too."""
    return {**runs[0], **over_seeds(runs), "step_s": statistics.fmean(r["step_s"] for r in runs)}


def _hand_made_row(label: str, out: Any) -> dict[str, Any]:
    return {"design": label, "params": out.params, "val": out.score, "test": out.test["accuracy"]}


def full_ft(task: Any, final: Any, seed: int = 0) -> dict[str, Any]:
    from petlsearch.runners.trainer import evaluate, train

    prep = M.full_finetuning(task.make_model())
    cfg = replace(final, seed=seed)
    result = train(prep.model, task, prep.groups(cfg), cfg)
    test = evaluate(prep.model, task, "test")["accuracy"]
    return {"params": prep.trainable, "val": result.val["accuracy"], "test": test, "seconds": result.seconds,
            "step_s": result.step_seconds}


def fidelities(quick: bool = False, trial_steps: int | None = None) -> tuple[Any, Any]:
    """(trial, final) TrainConfigs of this benchmark: 20-step trials validated on 256 examples
    every 10 steps, a 100-step final run at batch 16 (the zoo's)."""
    from petlsearch.runners.trainer import TrainConfig

    trial = TrainConfig(steps=trial_steps or (2 if quick else 20), batch_size=16, eval_every=0 if quick else 10,
                        max_eval_examples=256, device="cpu")
    return trial, TrainConfig(steps=3 if quick else 100, batch_size=16, max_eval_examples=512, device="cpu")


def one_search(task: Any, budget: str, strategy: str, trials: int, fidelity: Any, final: Any,
               seed: int) -> dict[str, Any]:
    from petlsearch.runners.search import search

    options = {"steps": max(1, (trials - 1) * fidelity.steps)} if strategy == "s3pet" else {}
    run = search(task=task, budget=budget, strategy=strategy, plugins=PLUGINS,
                 trials=trials if strategy != "s3pet" else 1, fidelity=replace(fidelity, seed=seed),
                 final=replace(final, seed=seed), seed=seed, strategy_options=options)
    return {"strategy": strategy, "budget": budget, "params": run.structure.result["trainable_params"],
            "val": run.final.score, "test": run.final.test["accuracy"], "search_s": run.search.seconds,
            "final_s": run.final.seconds, "cost": run.search.seconds / max(run.final.seconds, 1e-9),
            "placements": len(run.structure.placements), "search_steps": options.get("steps", trials * fidelity.steps),
            "plugins": dict(Counter(p.plugin for p in run.structure.placements)),  # what the search chose
            "lr_scale": run.search.train.get("lr_scale"),  # the searched rate scale (None: the recipes)
            "trials": [[r.score, r.metrics.get("loss"), r.train.get("lr_scale")] for r in run.search.history]}


def run(opts: Options) -> Report:
    from petlsearch.plugins import create_plugins
    from petlsearch.searchspace.graph import ModelGraph
    from petlsearch.searchspace.space import SearchSpace
    from petlsearch.strategies.base import LR_SCALES

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    task = tiny_task(128) if opts.quick else minilm_task()
    budgets = opts.pick(["0.1%"], ["0.01%", "0.1%", "1%"])
    trials = opts.pick(2, 6, opts.trials)
    fidelity, final = fidelities(opts.quick, opts.steps)
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    space = SearchSpace.from_graph(ModelGraph.from_model(task.make_model()), create_plugins(PLUGINS))
    designs = opts.pick([d for d in HAND_MADE if d[0] in ("LoRA q,v", "BitFit")], HAND_MADE)
    searches = [(RunLog.key(search=strategy, budget=budget, trials=trials, seed=seed, fidelity=fidelity.to_dict(),
                            recipes=recipes(), lr_scales=LR_SCALES if strategy != "s3pet" else None,
                            final=final.to_dict(), **strategy_defaults(strategy)),
                 lambda b=budget, s=strategy, seed=seed: one_search(task, b, s, trials, fidelity, final, seed))
                for budget in budgets for strategy in strategies(opts.quick, budget)
                for seed in range(seeds_of(opts, strategy))]
    designed = {b: hand_made_work(task, space, b, final, designs) for b in budgets}
    full_seeds = range(seeds_of(opts, "full"))
    work = [*searches, *(w for b in budgets for w in designed[b]),
            *((RunLog.key(full_finetuning=True, **replace(final, seed=seed).to_dict()),
               lambda seed=seed: full_ft(task, final, seed)) for seed in full_seeds)]
    values = journal.run_all(work, opts.reverse)
    rows, fulls = values[: len(searches)], values[len(values) - len(full_seeds):]
    full = full_summary(fulls)
    made = iter(values[len(searches):len(values) - len(full_seeds)])
    # the design picked on validation (seed 0) also runs the other seeds
    picked = {b: max((next(made) for _ in designed[b]), key=lambda r: r["val"], default=None) for b in budgets}
    more = {b: [w for seed in range(1, seeds_of(opts, "hand-made"))
                for w in hand_made_work(task, space, b, final, [d for d in designs if d[0] == p["design"]], seed)]
            for b, p in picked.items() if p is not None}
    extra = iter(journal.run_all([w for ws in more.values() for w in ws], opts.reverse))
    if opts.helper:
        return report
    hand = {b: design_summary([p, *(next(extra) for _ in more[b])]) if p is not None else None
            for b, p in picked.items()}
    for b, h in hand.items():
        log.info("search: best hand-made at %s: %s", b, h)
    table = Table(f"{task.model_name} on {task.name}: {trials} trials x {fidelity.steps} steps per search, final "
                  f"{final.steps} steps",
                  ["budget", "method", "seeds", "trainable", "test acc", "+- (std)", "val acc",
                   "search cost (x final run)"])
    for budget in budgets:
        for strategy in strategies(opts.quick, budget):
            rs = [r for r in rows if r["budget"] == budget and r["strategy"] == strategy]
            accs = [r["test"] for r in rs]
            table.add(budget, strategy, len(rs), round(statistics.fmean(r["params"] for r in rs)),
                      statistics.fmean(accs), std(accs),
                      statistics.fmean(r["val"] for r in rs), statistics.median(r["cost"] for r in rs))
        h = hand[budget]
        if h is not None:
            table.add(budget, f"best hand-made ({h['design']})", h["seeds"], h["params"], h["test"], h["std"],
                      h["val"], "")
    table.add("100%", "full fine-tuning", full["seeds"], full["params"], full["test"], full["std"], full["val"], "")
    report.tables.append(table)
    if not opts.quick:
        report.targets += targets(rows, hand, full)
    report.plots.append(str(pareto(rows, hand, full, opts.out / f"{report.stem}.png")))
    report.data = {"searches": rows, "hand_made": hand, "full_finetuning": full, "trials": trials,
                   "steps_per_trial": fidelity.steps, "final_steps": final.steps}
    report.notes.append("Equal compute: every strategy trains trials x steps-per-trial steps before its final run "
                        "(S3PET: a supernet of (trials - 1) x steps, then its structure for one trial).")
    if not opts.quick:
        report.notes.append(f"S3PET, the hand-made design picked on validation (seed 0) and full fine-tuning run "
                            f"{COMPARED_SEEDS} seeds (a seed sets the data order, the initialisation and, for S3PET, the split of "
                            "the training data and the gate noise): their test accuracy is the mean. Ray runs "
                            f"at {TARGET_BUDGET} only.")
    if opts.quick:
        report.notes.append("Quick mode: a tiny random BERT, 2 trials of 2 steps: the accuracies mean nothing.")
    return report


def targets(rows: list[dict[str, Any]], hand: dict[str, Any], full: dict[str, Any]) -> list[Target]:
    """Issue targets: S3PET beats random and matches the best hand-made structure at each budget,
    reaches 99% of full fine-tuning at 0.1%, and costs at most 3 final runs; Optuna beats random."""
    def test(budget: str, strategy: str) -> float:
        rs = [r["test"] for r in rows if r["budget"] == budget and r["strategy"] == strategy]
        return statistics.fmean(rs) if rs else float("nan")

    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        s3pet = test(budget, "s3pet")
        out.append(Target(f"s3pet - random test accuracy at {budget} (points)", 100 * (s3pet - test(budget, "random")),
                          0.0, ">="))
        if hand.get(budget):
            out.append(Target(f"s3pet - best hand-made test accuracy at {budget} (points)",
                              100 * (s3pet - hand[budget]["test"]), 0.0, ">="))
    out.append(Target("s3pet at 0.1% / full fine-tuning (test accuracy)", 100 * test("0.1%", "s3pet") / full["test"],
                      99.0, ">=", "%"))
    costs = [r["cost"] for r in rows if r["strategy"] == "s3pet"]
    # the whole search time over its supernet steps: an upper bound of a step (evaluations included)
    steps = [r["search_s"] / r["search_steps"] for r in rows if r["strategy"] == "s3pet" and r.get("search_steps")]
    if steps and full.get("step_s"):
        out.append(Target("s3pet supernet step (search time / steps) / full fine-tuning step",
                          statistics.median(steps) / full["step_s"], 2.5, "<=", "x"))
    out.append(Target("s3pet search cost, x one final run (median)", statistics.median(costs) if costs else
                      float("nan"), 3.0, "<=", "x"))
    out.append(Target("optuna - random test accuracy at 0.1% (points)",
                      100 * (test("0.1%", "optuna") - test("0.1%", "random")), 0.0, ">="))
    return out


def pareto(rows: list[dict[str, Any]], hand: dict[str, Any], full: dict[str, Any], path: Path) -> Path:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        ax.scatter([max(r["params"], 1) for r in rs], [r["test"] for r in rs], s=18, label=strategy)
    hs = [h for h in hand.values() if h is not None]
    if hs:
        ax.scatter([max(h["params"], 1) for h in hs], [h["test"] for h in hs], marker="x", color="black",
                   label="best hand-made")
    ax.axhline(full["test"], color="tab:red", ls="--", lw=1, label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head excluded)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs trainable parameters", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
    return path
