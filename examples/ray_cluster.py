"""Search a PETL structure on a Ray cluster (see docs/ray_cluster.md).

    # on the head node
    ray start --head --port=6379 --num-cpus=8
    # on every worker node (petlsearch and the demo data installed, same Python)
    ray start --address=HEAD_IP:6379
    # anywhere that can reach the head, e.g. on the head itself
    python examples/ray_cluster.py --address HEAD_IP:6379 --trials 32 --out runs/ray-cluster

Without --address it starts a local Ray on this machine, which is the quickest way to try it.
"""

from __future__ import annotations

import argparse
import logging

import petlsearch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster address (HEAD_IP:6379, ray://HEAD_IP:10001, auto)")
    p.add_argument("--budget", default="0.1%", help="parameter budget, e.g. 0.1%% or 25k")
    p.add_argument("--trials", type=int, default=16, help="trials in total (finished ones count on resume)")
    p.add_argument("--cpus-per-trial", type=float, default=2, help="CPU share of one trial")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPU share of one trial (0.5: two per GPU)")
    p.add_argument("--pareto", action="store_true", help="search the (score, params) Pareto front")
    p.add_argument("--out", default="runs/ray-cluster", help="run folder (Ray's experiment is in OUT/ray/tune)")
    p.add_argument("--resume", action="store_true", help="restore an interrupted search in --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    options = {"address": args.address, "cpus_per_trial": args.cpus_per_trial,
               "gpus_per_trial": args.gpus_per_trial, "max_failures": 2}
    if args.pareto:
        options["objectives"] = ("score", "params")
    result = petlsearch.search(budget=args.budget, strategy="ray", trials=args.trials, out=args.out,
                               resume=args.resume, strategy_options=options)
    best = result.search.best_record
    print(f"best of {len(result.search.history)} trials: score {best.score:.4f} with {best.params:,} parameters")
    print(f"Pareto front: {[(r.params, round(r.score, 4)) for r in result.search.pareto]}")
    print(f"structure: {result.files.get('structure')}; test accuracy {result.final.test.get('accuracy')}")


if __name__ == "__main__":
    main()
