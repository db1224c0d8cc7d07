"""Warm start: how many true evaluations a warm-started search needs to reach what a cold search reaches
with its whole budget, on one model and NFE, on the same search-split samples.

    python bench/warm_start_gain.py --model gmm-64d --nfe 5 --n-samples 500 --n-test-samples 2000

Runs, on one SQLite file: two earlier searches at another seed (one at the NFE, one at the NFE below), the
cold search at `--budget`, and warm searches at the same budget and seed as the cold one, from the earlier
study at the same NFE, from the one at the neighbouring NFE, and from a predictor saved from that
neighbouring study (`predictors.warm_start.fit_from_studies`, then `Predictor.save`). Prints, per arm, the
first true evaluation (counted in trial order) whose search-split value reaches the cold search's best at
the full budget, the arm's best search-split value, the winner's test value and the warm pairs it used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictors.warm_start import fit_from_studies  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def search(storage: str, name: str, args: argparse.Namespace, nfe: int, seed: int,
           warm: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    options = {"warm_start": warm} if warm else {}
    config = SearchConfig(model=args.model, nfe=(nfe,), budget=args.budget, seed=seed, n_samples=args.n_samples,
                          n_test_samples=args.n_test_samples, options=options)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    start = time.perf_counter()
    result = run_search(config, study)
    values = [t.value for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                                      key=lambda t: t.number) if t.value is not None]
    out = {"arm": name, "values": values, "best": min(values), "test": result.test_value,
           "warm_pairs": study.user_attrs.get("warm_start_pairs", 0),
           "warm_predicted": study.user_attrs.get("warm_start_predicted", 0), "seconds": time.perf_counter() - start}
    print(json.dumps({k: v for k, v in out.items() if k != "values"}), file=sys.stderr, flush=True)
    return out


def evaluations_to_reach(values: list[float], target: float) -> Optional[int]:
    """1-based index of the first value at or below target (None: never)."""
    return next((i + 1 for i, v in enumerate(values) if v <= target * (1 + 1e-12)), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-samples", type=int, default=500)
    ap.add_argument("--n-test-samples", type=int, default=2000)
    ap.add_argument("--predictor-kind", default="lightgbm-rank")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="warm_bench_"))
    db = f"sqlite:///{folder / 'bench.db'}"
    other = args.seed + 1
    search(db, "earlier-same-nfe", args, args.nfe, other)
    search(db, "earlier-nfe-below", args, args.nfe - 1, other)
    saved = fit_from_studies(db, ["earlier-nfe-below"], args.predictor_kind, seed=args.seed).save(folder / "saved")
    arms = [search(db, "cold", args, args.nfe, args.seed),
            search(db, "warm: study, same NFE", args, args.nfe, args.seed, {"studies": ["earlier-same-nfe"]}),
            search(db, "warm: study, NFE below", args, args.nfe, args.seed, {"studies": ["earlier-nfe-below"]}),
            search(db, "warm: saved predictor", args, args.nfe, args.seed, {"predictor_path": str(saved)})]
    target = arms[0]["best"]
    print(f"\n{args.model}, NFE {args.nfe}, budget {args.budget}, seed {args.seed}, n_samples {args.n_samples}; "
          f"cold best (search split) {target:.5g}\n")
    print("| arm | warm pairs (studies / predicted) | evaluations to reach the cold best | best (search) | "
          "winner test |")
    print("|---|---|---|---|---|")
    for a in arms:
        n = evaluations_to_reach(a["values"], target)
        test = f"{a['test']:.5g}" if math.isfinite(a["test"]) else "-"
        print(f"| {a['arm']} | {a['warm_pairs']} / {a['warm_predicted']} | {n if n else f'> {args.budget}'} | "
              f"{a['best']:.5g} | {test} |")


if __name__ == "__main__":
    main()
