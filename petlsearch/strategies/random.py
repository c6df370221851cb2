"""Random search: uniform structures under the budget, each with a log-uniform learning-rate scale
(SearchContext.lr_scales), the baseline every other strategy must beat at equal compute. Trial i
depends only on (seed, i), so a resumed search skips the trials that finished and proposes
exactly the ones that did not."""

from __future__ import annotations

import random
import time

from petlsearch.strategies.base import SearchContext, SearchResult, Strategy


class RandomSearch(Strategy):
    name = "random"

    def __init__(self, max_placements: int | None = None) -> None:
        self.max_placements = max_placements

    def run(self, ctx: SearchContext) -> SearchResult:
        start = time.monotonic()
        history = list(ctx.finished().values())
        done = {r.number for r in history}
        for number in range(ctx.n_trials):
            if number in done:
                continue
            if ctx.out_of_time():
                break
            rng = random.Random(f"{ctx.seed}:{number}")
            placements = ctx.space.sample(rng, ctx.budget, ctx.shape if ctx.budget.memory else None,
                                          self.max_placements)
            history.append(ctx.evaluate(number, placements, train=ctx.sample_train(rng)))
        return self.result(ctx, history, start)
