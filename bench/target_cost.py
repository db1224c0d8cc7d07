"""What restricting a search to one runtime costs: the same search (same seed) with target any and each target.

    OMP_NUM_THREADS=1 python bench/target_cost.py --models gmm-64d --nfe 5 --budget 100 --n-samples 1000 \
        --n-test 4000 --seeds 0 1 2 3 4 5 6 7
    OMP_NUM_THREADS=1 python bench/target_cost.py --models digits-t2i --nfe 5 --budget 60 \\
        --space '{"t_start_span": 0, "t_end_span": 0}'

A target narrows the space and the seeding baselines to what its runtime runs at the searched NFE
(docs/search.md, "Targets"). Targets whose narrowed job equals another's are that run again, so they share it
(printed "= any"). Values are the winner's on the test split (fresh seeds, lower is better); the ratio is the
target's over any's at the same seed. In-memory studies; one LocalEvaluator serves every run of a model, so
the reference trajectories and the schedules both runs evaluate are computed once (the same seeds give the same
values). Baselines are not test-scored (only the winner's test value is compared). `--space` adds SpaceOptions
fields to every run alike: on a model without an exact ODE (digits-t2i) the trajectory metric integrates a
200-step reference for every distinct start and end time, and fixing both keeps that to a few. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3search.evaluation.local import LocalEvaluator  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402
from s3search.space import TARGETS  # noqa: E402


def _config(args: argparse.Namespace, model: str, target: str, seed: int) -> SearchConfig:
    opts = {"target": target, "population": 64, "children": 64, "generations": 3, "test_baselines": False,
            "validation_samples": args.n_samples, "space": json.loads(args.space)}
    return SearchConfig(model=model, nfe=(args.nfe,), n_samples=args.n_samples, n_test_samples=args.n_test,
                        budget=args.budget, method="s3", predictor=args.predictor, seed=seed, options=opts)


def _job(config: SearchConfig, spec: Any) -> str:
    """What the search actually runs: the space and the baselines after the target's narrowing."""
    options = config.with_model_defaults(spec.default_metric, spec).to_dict()["options"]
    return json.dumps([options["space"], options["baselines"]], sort_keys=True)


def _search(config: SearchConfig, label: str, evaluator: Any) -> dict[str, Any]:
    t = time.perf_counter()

    def progress(p: Any) -> None:
        print(f"  {label}: {p.evaluations}/{p.budget} best {p.best_value:.4g} {p.message}", file=sys.stderr,
              flush=True)

    result = run_search(config, optuna.create_study(direction="minimize"), evaluator=evaluator, progress=progress)
    best = result.best
    return {"test": result.test_value, "seconds": time.perf_counter() - t,
            "first_step": getattr(best, "first_step", "(named)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gmm-64d", "digits-t2i"])
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--n-samples", type=int, default=256, help="per search and validation evaluation")
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--predictor", default="lightgbm-rank")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--space", default="{}", help="SpaceOptions fields (JSON) added to every run")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for model in args.models:
        spec = registry.get(model)
        evaluator = LocalEvaluator()
        for seed in args.seeds:
            runs: dict[str, tuple[str, dict[str, Any]]] = {}
            for target in TARGETS:
                config = _config(args, model, target, seed)
                key = _job(config, spec)
                if key in runs:
                    rows.append((model, seed, target, runs[key][0], runs[key][1]))
                    continue
                print(f"{model} seed={seed} target={target}", file=sys.stderr, flush=True)
                out = _search(config, f"{model}/{seed}/{target}", evaluator)
                runs[key] = (target, out)
                rows.append((model, seed, target, target, out))
    print(f"NFE {args.nfe}, budget {args.budget}, {args.n_samples} search and validation / {args.n_test} test "
          f"samples, predictor {args.predictor}, space {args.space}\n")
    print("| model | seed | target | searched (test) | ratio to any | winner's first step | run |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[tuple[str, str], list[float]] = {}
    for model, seed, target, same, out in rows:
        base = next(o for m, s, t, _, o in rows if m == model and s == seed and t == "any")
        ratio = out["test"] / base["test"] if base["test"] else math.nan
        ratios.setdefault((model, target), []).append(ratio)
        run = f"{out['seconds']:.0f} s" if same == target else f"= {same}"
        print(f"| {model} | {seed} | {target} | {out['test']:.4g} | {ratio:.3f} | {out['first_step']} | {run} |")
    if len(args.seeds) > 1:
        # Ratios multiply: their geometric mean, and the median, are the summaries that treat 0.5 and 2 alike.
        print("\n| model | target | geometric mean ratio | median ratio | ratios by seed |")
        print("|---|---|---|---|---|")
        for (model, target), values in ratios.items():
            geo = math.exp(sum(math.log(v) for v in values) / len(values))
            print(f"| {model} | {target} | {geo:.3f} | {statistics.median(values):.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
