"""Run pictures say what they show: one panel where the search had one trial, layers named as in
structure files."""

from __future__ import annotations

from petlsearch.runners import report
from petlsearch.strategies.base import TrialRecord
from tests.helpers import frozen_tiny


def _trial(number: int, score: float) -> TrialRecord:
    return TrialRecord(number=number, placements=[], params=10, score=score, status="complete")


def test_a_single_trial_search_curve_is_the_supernet_panel_alone() -> None:
    curve = [{"step": s, "loss": 1.0 / s, "budget_use": 1.0} for s in range(1, 5)]
    one = report.search_curve_figure([_trial(0, 0.7)], curve=curve)
    assert len(one.axes) == 2  # the supernet's loss and its twin axis for the budget use
    assert "trial 0 scored 0.7000" in one.axes[0].get_title()
    many = report.search_curve_figure([_trial(0, 0.6), _trial(1, 0.7)], curve=curve)
    assert len(many.axes) == 3 and many.axes[0].get_xlabel() == "trial"


def test_the_graph_picture_names_layers_as_structure_files_do() -> None:
    _, graph = frozen_tiny("bert")
    labels = [t.get_text() for t in report.graph_figure(graph).axes[0].get_xticklabels()]
    assert labels[0] == "outside" and labels[1:] == ["L0", "L1"]
