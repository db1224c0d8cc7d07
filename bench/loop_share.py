"""Budget shares: the shares before issue 19 (loop_share 0, refine_share 0.5, reproduced with explicit options),
the first design tried and the current defaults, side by side with the same seeds, on gmm-64d.

    python bench/loop_share.py --budgets 60,200 --seeds 0,1 --arms old,first,new
    python bench/loop_share.py --budgets 60 --seeds 0 --n-samples 500 --n-test-samples 2000   # quicker

Prints, per run, the share of true evaluations per source, the predictor loop's share (sources s3 and s3-local),
the winner's source and test-split value, the run's best baseline on the test split, and the winner's ratio to
the best baseline any arm found at that budget and seed (below 1: the search wins); progress and each run's
JSON go to stderr, the table to stdout at the end. Real LocalEvaluator, in-memory Optuna studies.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402
from s3search.search.study import ATTR  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARMS: dict[str, dict] = {
    "old": {"loop_share": 0.0, "refine_share": 0.5},     # the shares before issue 19 item 3
    "first": {"loop_share": 0.35, "refine_share": 0.3},  # the first design tried (BENCHMARKS.md)
    "new": {},                                           # the defaults
}
LOOP = ("s3", "s3-local")


def run_one(arm: str, model: str, nfe: int, budget: int, seed: int, n_samples: int, n_test: int) -> dict:
    config = SearchConfig(model=model, nfe=(nfe,), budget=budget, seed=seed, n_samples=n_samples,
                          n_test_samples=n_test, options=dict(ARMS[arm]))
    study = optuna.create_study(direction="minimize")
    start = time.perf_counter()
    result = run_search(config, study)
    sources = collections.Counter(t.user_attrs.get(ATTR.SOURCE, "?") for t in study.get_trials()
                                  if ATTR.SOURCE in t.user_attrs)
    total = sum(sources.values())
    best_base = min((v for v in result.baselines.values() if math.isfinite(v)), default=math.nan)
    return {"arm": arm, "budget": budget, "seed": seed, "sources": dict(sources), "total": total,
            "loop": sum(sources.get(s, 0) for s in LOOP) / max(total, 1), "test": result.test_value,
            "best_baseline": best_base, "winner": result.winner_source, "seconds": time.perf_counter() - start}


def row(r: dict, yardstick: float) -> str:
    """yardstick: the best baseline test value over every arm of this budget and seed. An arm that seeds fewer
    baseline grids finds a weaker best baseline, so its own ratio would flatter it."""
    shares = ", ".join(f"{k} {v}" for k, v in sorted(r["sources"].items()))
    return (f"| {r['budget']} | {r['seed']} | {r['arm']} | {100 * r['loop']:.0f}% | {shares} | {r['winner']} | "
            f"{r['test']:.4f} | {r['best_baseline']:.4f} | {r['test'] / yardstick:.3f} | {r['seconds']:.0f} |")


HEADER = ("| budget | seed | shares | loop share | evaluations per source | winner from | test | best baseline of "
          "this run (test) | test / best baseline of all arms | s |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budgets", default="60,200")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                    help='an extra arm: a name and its search options, e.g. v2=\'{"refine_share": 0.2}\'')
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-test-samples", type=int, default=5000)
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    for spec in args.arm:
        name, _, doc = spec.partition("=")
        ARMS[name] = json.loads(doc)
        arms.append(name)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in arms:
                print(f"running {arm} budget {budget} seed {seed} ...", file=sys.stderr, flush=True)
                r = run_one(arm, args.model, args.nfe, budget, seed, args.n_samples, args.n_test_samples)
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    print(HEADER)
    for r in rows:
        yardstick = min(o["best_baseline"] for o in rows if (o["budget"], o["seed"]) == (r["budget"], r["seed"]))
        print(row(r, yardstick))


if __name__ == "__main__":
    main()
