"""What the predictor adds (issue 19 item 1): full S³ against the same pipeline without it, side by side.

Arms, each run with the same seeds, budgets and samples:
- `s3`: the defaults;
- `uniform`: the same pipeline with the predictor replaced by uniform random scores, so every candidate pool
  (evolution, local moves, niches) is chosen from at random (the predictor is registered by this script only);
- `seed-refine`: the same seeding, the loop's share given to grid refinement (one loop evaluation is left,
  because a zero loop share switches the seeding back to its pre-issue-19 rules);
- `random`, `tpe`, `cmaes`: Optuna's samplers on the flat encoding of the space (method option), unseeded.

Prints one row per (budget, seed, arm): the winner's test value and its ratio to the best baseline found by any
arm of that cell, then per budget the share of cells in which `s3` is ahead of every other arm.

    OMP_NUM_THREADS=1 python bench/ablation.py --model gmm-64d --nfe 5 --budgets 50,100 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import predictors  # noqa: E402
from predictors.base import Predictor  # noqa: E402
from s3search.schedule import SolverSchedule  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


class UniformScores(Predictor):
    """Scores drawn uniformly at random: the predictor's place in the pipeline with no knowledge in it."""

    kind = "uniform"

    def _fit(self, schedules: Sequence[SolverSchedule], targets: np.ndarray, groups: np.ndarray) -> None:
        self._rng = np.random.default_rng(self.seed + len(schedules))

    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        return self._rng.uniform(size=len(schedules))

    def _save_model(self, folder: Path) -> dict[str, Any]:
        return {}

    def _load_model(self, folder: Path, state: dict[str, Any]) -> None:
        self._rng = np.random.default_rng(self.seed)


predictors._REGISTRY[UniformScores.kind] = UniformScores

ARMS: dict[str, dict[str, Any]] = {
    "s3": {},
    "uniform": {"predictor": "uniform"},
    "seed-refine": {"options": {"loop_share": 0.01, "refine_share": 0.44}},
    "random": {"method": "random"},
    "tpe": {"method": "tpe"},
    "cmaes": {"method": "cmaes"},
}


def run_one(arm: str, model: str, nfe: int, budget: int, seed: int, n_samples: int, n_test: int) -> dict:
    spec = ARMS[arm]
    config = SearchConfig(model=model, nfe=(nfe,), budget=budget, seed=seed, n_samples=n_samples,
                          n_test_samples=n_test, method=spec.get("method", "s3"),
                          predictor=spec.get("predictor", "lightgbm-rank"), options=dict(spec.get("options", {})))
    study = optuna.create_study(direction="minimize")
    start = time.perf_counter()
    result = run_search(config, study)
    best_base = min((v for v in result.baselines.values() if math.isfinite(v)), default=math.inf)
    return {"arm": arm, "budget": budget, "seed": seed, "test": result.test_value, "best_baseline": best_base,
            "winner": result.winner_source, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budgets", default="50,100")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-test-samples", type=int, default=2000)
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in arms:
                print(f"running {arm} budget {budget} seed {seed} ...", file=sys.stderr, flush=True)
                r = run_one(arm, args.model, args.nfe, budget, seed, args.n_samples, args.n_test_samples)
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    print(f"{args.model}, NFE {args.nfe}, {args.n_samples} search / {args.n_test_samples} test samples; "
          "ratio = test value / the best baseline any arm of the cell found (test split)")
    print("| budget | seed | arm | winner from | test | ratio | s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cell = [o for o in rows if (o["budget"], o["seed"]) == (r["budget"], r["seed"])]
        yardstick = min(o["best_baseline"] for o in cell)
        print(f"| {r['budget']} | {r['seed']} | {r['arm']} | {r['winner']} | {r['test']:.4f} | "
              f"{r['test'] / yardstick:.3f} | {r['seconds']:.0f} |")
    if "s3" in arms:
        for budget in sorted({r["budget"] for r in rows}):
            cells = sorted({r["seed"] for r in rows if r["budget"] == budget})
            ahead = 0
            for seed in cells:
                cell = {r["arm"]: r["test"] for r in rows if (r["budget"], r["seed"]) == (budget, seed)}
                ahead += all(cell["s3"] < v for a, v in cell.items() if a != "s3")
            print(f"budget {budget}: s3 ahead of every other arm in {ahead} of {len(cells)} cells")


if __name__ == "__main__":
    main()
