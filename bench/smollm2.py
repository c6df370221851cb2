"""SmolLM2: causal language modelling with the real 30-layer Llama-family decoder (SmolLM2-135M).

The corpus is real text that installs offline: the first 4,000 Rotten Tomatoes snippets, one per
line (`lm:FILE`: seeded train / validation / test splits of the lines). Each method trains at its
plugin's recipe for the same steps (batch 8, sequences cut at 48 tokens, AdamW, linear decay;
the pretrained output layer, tied to the embeddings, stays frozen), beside full fine-tuning (5e-5)
and the pretrained model as it is; `petlsearch search --budget 0.1%` (S3PET over the default
space, its supernet given 3 x 20 steps) retrains its structure for the same steps. Reported: the
test perplexity and next-token accuracy before (pretrained) and after, and trainable parameters.
One seed; finished runs are kept in results/raw/smollm2-runs.jsonl. Not in the default run
(`python -m bench --only smollm2`): a step of full fine-tuning takes seconds on one core.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import methods as M
from bench.common import Options, Report, RunLog, Table, Target

log = logging.getLogger(__name__)
NAME = "smollm2"
TITLE = "SmolLM2: causal language modelling on real text with the real decoder"
LINES = 4000
MAX_LENGTH = 48
PRETRAINED, FULL, SEARCH = "pretrained (no training)", "full fine-tuning", "search 0.1% (s3pet)"
PLUGINS = (("LoRA q,v", "lora", ("attn.q", "attn.v")), ("LoRA", "lora", None), ("IA3", "ia3", None),
           ("Houlsby adapter", "adapter", None), ("prefix tuning", "prefix_tuning", None),
           ("prompt tuning", "prompt_tuning", None), ("LST", "lst", None))


def corpus(out: Path, quick: bool) -> Path:
    """The corpus file: Rotten Tomatoes snippets, one per line."""
    from bench.tasks import rotten_tomatoes

    path = out / "raw" / f"smollm2-corpus{'-quick' if quick else ''}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rotten_tomatoes(0).x_train[: 120 if quick else LINES]) + "\n")
    return path


@functools.lru_cache(maxsize=1)
def tiny_lm_folder() -> str:
    """Quick mode's decoder: a 2-layer random Llama with MiniLM's tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from petlsearch.runners.data import minilm_path

    folder = tempfile.mkdtemp(prefix="petlsearch-tiny-llama-")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def method_table() -> dict[str, tuple[dict[str, Any], Callable[[Any], M.Prepared]]]:
    """label -> (the recipe it trains at, part of its run's key; setup(model))."""
    from petlsearch.plugins import create_plugin

    out: dict[str, tuple[dict[str, Any], Callable[[Any], M.Prepared]]] = {
        FULL: (M.FULL_FINETUNING.to_dict(), lambda m: M.full_finetuning(m, new_head=False))}
    for label, plugin, roles in PLUGINS:
        out[label] = (create_plugin(plugin).recipe.to_dict(),
                      lambda m, p=plugin, r=roles: M.apply_plugin(m, p, roles=r, new_head=False))
    return out


def train_lm(task: Any, setup: Callable[[Any], M.Prepared], cfg: Any) -> dict[str, Any]:
    """One run: a fresh model, the method, training, the test split's metrics."""
    from petlsearch.runners.trainer import evaluate, train

    prep = setup(M.fresh_model(task, cfg.seed))
    result = train(prep.model, task, prep.groups(cfg), cfg)
    return {"trainable": prep.trainable, "val_perplexity": result.val["perplexity"],
            "step_s": result.step_seconds, **_test(evaluate(prep.model, task, "test"))}


def _test(metrics: dict[str, float]) -> dict[str, float]:
    return {"test_perplexity": metrics["perplexity"], "test_token_accuracy": metrics["token_accuracy"]}


def pretrained(task: Any) -> dict[str, Any]:
    from petlsearch.runners.trainer import evaluate

    return {"trainable": 0, "val_perplexity": None, "step_s": 0.0, **_test(evaluate(task.make_model(), task, "test"))}


def searched(task: Any, fidelity: Any, final: Any) -> dict[str, Any]:
    from petlsearch.runners.search import search

    run = search(task=task, budget="0.1%", strategy="s3pet", trials=1, fidelity=fidelity, final=final, seed=0,
                 strategy_options={"steps": 3 * fidelity.steps})
    return {"trainable": run.structure.result["trainable_params"], "val_perplexity": run.final.metrics["perplexity"],
            "step_s": run.final.train.step_seconds, "placements": len(run.structure.placements),
            "plugins": sorted({p.plugin for p in run.structure.placements}), **_test(run.final.test)}


def run(opts: Options) -> Report:
    from petlsearch.runners.tasks import get_task
    from petlsearch.runners.trainer import TrainConfig

    report = Report(NAME, TITLE, __doc__.split("\n", 1)[1].strip(), opts.quick)
    model = tiny_lm_folder() if opts.quick else "smollm2"
    task = get_task(f"lm:{corpus(opts.out, opts.quick)}", model, max_length=MAX_LENGTH)
    steps = opts.pick(3, 100, opts.steps)
    cfg = TrainConfig(steps=steps, batch_size=8, max_eval_examples=256, device="cpu")
    fidelity = TrainConfig(steps=opts.pick(2, 20), batch_size=8, max_eval_examples=64, device="cpu")
    journal = RunLog(opts.out / "raw" / f"{report.stem}-runs.jsonl")
    base = {"task": task.name, "model": task.model_name, **cfg.to_dict()}
    work = [(RunLog.key(method=PRETRAINED, **base), lambda: pretrained(task))]
    for label, (recipe, setup) in method_table().items():
        work.append((RunLog.key(method=label, recipe=recipe, **base), lambda s=setup: train_lm(task, s, cfg)))
    work.append((RunLog.key(method=SEARCH, fidelity=fidelity.to_dict(), **base), lambda: searched(task, fidelity, cfg)))
    values = journal.run_all(work, opts.reverse)
    if opts.helper:
        return report
    labels = [PRETRAINED, *method_table(), SEARCH]
    rows = dict(zip(labels, values))
    table = Table(f"{task.model_name} on {LINES if not opts.quick else 120} Rotten Tomatoes snippets (lm:), {steps} "
                  f"steps at batch 8 x {MAX_LENGTH} tokens, seed 0", ["method", "trainable", "% of backbone",
                                                                       "test perplexity", "test next-token acc",
                                                                       "step s"])
    backbone = _backbone_params(task)
    for label, r in rows.items():
        table.add(label, r["trainable"], 100 * r["trainable"] / backbone, r["test_perplexity"],
                  r["test_token_accuracy"], r["step_s"])
    report.tables.append(table)
    if not opts.quick:
        for label in ("LoRA q,v", SEARCH):
            report.targets.append(Target(f"{label}: test perplexity / the pretrained model's",
                                         rows[label]["test_perplexity"] / rows[PRETRAINED]["test_perplexity"], 1.0, "<"))
    else:
        report.notes.append("Quick mode: a tiny random Llama on 120 snippets: the figures check that the code runs.")
    report.data = {"runs": rows, "steps": steps, "backbone_params": backbone}
    return report


def _backbone_params(task: Any) -> int:
    from petlsearch.searchspace.graph import ModelGraph

    return ModelGraph.from_model(task.make_model()).num_parameters()

