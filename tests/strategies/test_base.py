"""The pieces every strategy shares: the Pareto front of a history."""

from __future__ import annotations

from petlsearch.strategies.base import TrialRecord, pareto_front


def _record(n: int, score: float | None, params: int, memory: int, status: str = "complete") -> TrialRecord:
    return TrialRecord(n, [], params, status, score=score, memory=memory)


def test_pareto_front_by_params_or_by_memory() -> None:
    history = [_record(0, 0.70, params=100, memory=900), _record(1, 0.80, params=300, memory=500),
               _record(2, 0.75, params=200, memory=800), _record(3, 0.60, params=50, memory=1000),
               _record(4, 0.90, params=10, memory=100, status="pruned"), _record(5, None, params=1, memory=1, status="failed"),
               _record(6, 0.80, params=300, memory=500)]  # a tie with trial 1: the first is kept
    assert [r.number for r in pareto_front(history)] == [3, 0, 2, 1]
    assert [r.number for r in pareto_front(history, cost="memory")] == [1]
