"""Recipes: each plugin's modules train at its declared rate, --lr and a config file change them, the
structure file records the searched scale, and a run that learned nothing says so."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from petlsearch.cli import _parse
from petlsearch.cli.commands import _training
from petlsearch.errors import PetlsearchError, PluginError
from petlsearch.plugins import create_plugin, create_plugins
from petlsearch.plugins.registry import validate
from petlsearch.runners.search import distinguished, search, train_section
from petlsearch.runners.trainer import TrainConfig, recipe_groups
from petlsearch.runners.trial import run_trial
from petlsearch.searchspace.graph import ModelGraph
from petlsearch.searchspace.recipe import DEFAULT_RECIPE, HEAD_LR, Recipe
from petlsearch.searchspace.space import SearchSpace
from petlsearch.searchspace.structure import Structure
from petlsearch.strategies.base import TrialRecord

ONE_STEP = TrainConfig(steps=1, batch_size=8, max_eval_examples=16, device="cpu")


def placements_of(task, plugin: str, role: str):
    space = SearchSpace.from_graph(ModelGraph.from_model(task.make_model()), create_plugins([plugin]))
    return space, [c.placement(space.plugins[plugin].config(c.site)) for c in space.candidates if c.site.role == role]


def moved_by(tiny_task, cfg: TrainConfig) -> dict[str, float]:
    """Per plugin, the largest change of one optimizer step on LoRA (q) + IA3 (ffn.down) weights.
    Adam's first step moves every entry with a gradient by its group's rate (m / sqrt(v) = +-1, less
    Adam's eps for the smallest gradients: hence the 5% tolerance, far below the rates' ratios)."""
    lora_space, lora = placements_of(tiny_task, "lora", "attn.q")
    ia3_space, ia3 = placements_of(tiny_task, "ia3", "ffn.down")
    plugins = {**lora_space.plugins, **ia3_space.plugins}
    captured: dict[str, list[torch.Tensor]] = {}
    import petlsearch.runners.trial as trial

    real = trial.train

    def spy(model, task, groups, cfg, **kw):
        captured.update({g.name: [p.detach().clone() for p in g.params] for g in groups})
        result = real(model, task, groups, cfg, **kw)
        captured.update({f"{g.name}/after": [p.detach().clone() for p in g.params] for g in groups})
        return result

    trial.train = spy
    try:
        run_trial(tiny_task, lora + ia3, plugins, cfg)
    finally:
        trial.train = real
    return {name: max(float((a - b).abs().max()) for a, b in zip(captured[f"{name}/after"], captured[name]))
            for name in ("lora", "ia3")}


def test_each_plugin_trains_at_its_recipe_rate(tiny_task) -> None:
    lora, ia3 = create_plugin("lora").recipe.lr, create_plugin("ia3").recipe.lr
    assert lora != ia3  # the test needs two different declared rates
    moved = moved_by(tiny_task, ONE_STEP)
    assert moved["lora"] == pytest.approx(lora, rel=0.05) and moved["ia3"] == pytest.approx(ia3, rel=0.05)


def test_lr_flag_and_config_file_change_the_rates(tiny_task, tmp_path) -> None:
    lora, ia3 = create_plugin("lora").recipe.lr, create_plugin("ia3").recipe.lr
    scaled = moved_by(tiny_task, replace(ONE_STEP, **_training(_parse(["search", "--lr", "2x"]))))
    assert scaled["lora"] == pytest.approx(2 * lora, rel=0.05) and scaled["ia3"] == pytest.approx(2 * ia3, rel=0.05)
    config = tmp_path / "run.yaml"
    config.write_text("lr: 5e-3\nbatch-size: 8\n")
    args = _parse(["search", "--config", str(config)])
    assert args.batch_size == 8
    absolute = moved_by(tiny_task, replace(ONE_STEP, **_training(args)))
    assert absolute["lora"] == pytest.approx(5e-3, rel=0.05) and absolute["ia3"] == pytest.approx(5e-3, rel=0.05)
    assert _parse(["search", "--config", str(config), "--batch-size", "4"]).batch_size == 4  # flags win


@pytest.mark.parametrize("text, message", [
    ("lots: 1\n", "unknown option 'lots'"),
    ("lr: fast\n", "cannot read the learning rate 'fast'"),
    ("include-head: 3\n", "is a switch"),
    ("- a list\n", "a mapping of option names"),
])
def test_bad_config_is_one_clear_error(tmp_path, text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(PetlsearchError, match=message):
        _training(_parse(["search", "--config", str(config)]))


def test_head_rate_comes_from_the_recipes_unless_given() -> None:
    side = Recipe(lr=1e-3, source="test", head_lr=1e-3)
    head = [torch.nn.Parameter(torch.zeros(2))]
    by_plugin = {"a": [torch.nn.Parameter(torch.zeros(3))], "side": [torch.nn.Parameter(torch.zeros(3))]}
    groups = {g.name: g.lr for g in recipe_groups(by_plugin, {"side": side}, head, TrainConfig())}
    assert groups == {"a": DEFAULT_RECIPE.lr, "side": 1e-3, "head": 1e-3}
    assert recipe_groups({}, {}, head, TrainConfig())[-1].lr == HEAD_LR
    assert recipe_groups(by_plugin, {"side": side}, head, TrainConfig(head_lr=0.5))[-1].lr == 0.5


def test_a_bad_recipe_fails_at_registration() -> None:
    lora = type(create_plugin("lora"))
    bad = type("BadRate", (lora,), {"name": "bad_rate", "recipe": Recipe(lr=-1.0, source="x")})
    with pytest.raises(PluginError, match="bad_rate.*lr=-1.0"):
        validate(bad)
    unsourced = type("NoSource", (lora,), {"name": "no_source", "recipe": Recipe(lr=1e-3, source=" ")})
    with pytest.raises(PluginError, match="source"):
        validate(unsourced)
    wrong = type("NotARecipe", (lora,), {"name": "not_a_recipe", "recipe": {"lr": 1e-3}})
    with pytest.raises(PluginError, match="must be a petlsearch.searchspace.recipe.Recipe"):
        validate(wrong)


def test_every_builtin_declares_a_valid_recipe() -> None:
    from petlsearch.plugins import list_plugins

    for name in list_plugins():
        recipe = create_plugin(name).recipe
        recipe.check(name)
        assert recipe is not DEFAULT_RECIPE or name not in ("lora", "ia3", "prompt_tuning"), name


def test_search_records_the_scale_and_warns_when_nothing_was_learned(tiny_task, tmp_path) -> None:
    """A random search of two 2-step trials, its structure retrained for one step: the lr scale it
    found is in the structure's train section (and used), and the run says it beat no baseline."""
    said: list[str] = []
    fast = TrainConfig(steps=2, batch_size=8, max_eval_examples=16, device="cpu")
    result = search(task=tiny_task, budget="5%", strategy="random", plugins=["lora"], trials=2, out=tmp_path / "r",
                    fidelity=fast, final=replace(fast, steps=1), progress=said.append)
    best = result.search.best_record
    assert "lr_scale" in best.train and result.structure.train["lr_scale"] == pytest.approx(best.train["lr_scale"])
    res = result.structure.result
    assert set(res["baselines"]) == {"majority_class", "head_only"}
    beaten = all(res["test"]["accuracy"] > b for b in res["baselines"].values())
    assert res["beats_baselines"] == beaten
    warned = [m for m in said if m.startswith("warning: ") and "does not beat" in m]
    assert bool(warned) == (not beaten) and not beaten, said  # one step learns nothing
    loaded = Structure.load(tmp_path / "r" / "structure.yaml")
    assert loaded.train == result.structure.train and loaded.train["steps"] == 1
    assert (tmp_path / "r" / "run.yaml").exists() is False  # the Python API writes run.yaml only when asked


def test_trials_that_all_tie_are_reported() -> None:
    def record(n: int, score: float) -> TrialRecord:
        return TrialRecord(n, [], 1, "complete", score, {"loss": 0.6 + n})

    assert not distinguished([record(0, 0.59), record(1, 0.59)])
    assert distinguished([record(0, 0.59), record(1, 0.61)]) and distinguished([record(0, 0.59)])


def test_train_section_repeats_the_final_settings() -> None:
    cfg = TrainConfig(steps=7, batch_size=4, lr_scale=2.5)
    section = train_section(cfg, 48)
    assert section["lr_scale"] == 2.5 and section["steps"] == 7 and section["max_length"] == 48
    assert "lr" not in section and "head_lr" not in section  # unset: the recipes decide


def test_conformance_kit_checks_the_recipe() -> None:
    from petlsearch.plugins.testing import ConformanceError, check_recipe

    lora = type(create_plugin("lora"))
    check_recipe(lora(), "bert")
    bad = type("ZeroRate", (lora,), {"name": "zero_rate", "recipe": Recipe(lr=0.0, source="x")})
    with pytest.raises(ConformanceError, match=r"\[zero_rate\] check_recipe on bert: .*lr=0.0"):
        check_recipe(bad(), "bert")


def test_auto_head_rate_picks_the_best_head_alone_and_every_run_uses_it(tiny_task, tmp_path, monkeypatch) -> None:
    """--head-lr auto: the head alone at each of HEAD_RATES, the best on validation (loss breaks
    ties) is the rate of every trial, the final run, the head-only baseline and the train section."""
    import petlsearch.runners.trial as trial

    seen: list[float | None] = []
    real = trial.train

    def spy(model, task, groups, cfg, **kw):
        seen.append(next(g.lr for g in groups if g.name == "head"))
        return real(model, task, groups, cfg, **kw)

    monkeypatch.setattr(trial, "train", spy)
    fast = TrainConfig(steps=2, batch_size=8, max_eval_examples=16, device="cpu")
    result = search(task=tiny_task, budget="5%", strategy="random", plugins=["lora"], trials=2, out=tmp_path / "r",
                    fidelity=fast, final=fast, auto_head_lr=True)
    rates = result.structure.result["head_rates"]
    assert list(rates) == [f"{r:g}" for r in trial.HEAD_RATES]
    sweep, rest = seen[:len(trial.HEAD_RATES)], seen[len(trial.HEAD_RATES):]
    assert sweep == list(trial.HEAD_RATES)
    picked = result.structure.train["head_lr"]
    assert picked in trial.HEAD_RATES and rates[f"{picked:g}"] == max(rates.values())
    assert len(rest) == 2 + 1 + 1 and set(rest) == {picked}  # two trials, the final run, the head-only baseline


def test_auto_head_rate_flag_and_its_errors(tmp_path) -> None:
    from petlsearch.cli.commands import auto_head_lr

    assert auto_head_lr(_parse(["search", "--head-lr", "auto"])) and "head_lr" not in _training(
        _parse(["search", "--head-lr", "auto"]))
    assert _training(_parse(["search", "--head-lr", "0.05"]))["head_lr"] == 0.05
    config = tmp_path / "run.yaml"
    config.write_text("head-lr: auto\n")
    assert auto_head_lr(_parse(["search", "--config", str(config)]))
    for bad in ("fast", "-1", "0"):
        with pytest.raises(PetlsearchError, match="--head-lr must be a positive rate or 'auto'"):
            _training(_parse(["search", "--head-lr", bad]))
    with pytest.raises(PetlsearchError, match="--head-lr auto is a search option"):
        _training(_parse(["train", "s.yaml", "--head-lr", "auto"]))


def test_a_head_rate_needs_a_new_head(tiny_task) -> None:
    from petlsearch.runners.trial import pick_head_rate

    with pytest.raises(PetlsearchError, match="only be picked for a task with a new head"):
        pick_head_rate(replace(tiny_task, kind="lm"), ONE_STEP)
