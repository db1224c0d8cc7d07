"""One S³ search, then every validation contender's value on the search, validation and test splits.

    OMP_NUM_THREADS=1 python bench/search_probe.py --model digits --nfe 10 --budget 200 --n-samples 2000 --n-test 2000
    OMP_NUM_THREADS=1 python bench/search_probe.py --model digits --nfe 10 --budget 200 --n-samples 8000 --n-test 8000

Shows whether the schedules that lead on the search split keep their lead on seeds no trial used (a search at
too few samples per evaluation fits its seeds). The test values printed are diagnostics: the search never sees
them. In-memory study, the real LocalEvaluator.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3search.evaluation.base import EvalRequest  # noqa: E402
from s3search.evaluation.local import LocalEvaluator  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402
from s3search.search.study import ATTR, schedule_from_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--n-samples", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", default="{}", help="search options as JSON")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric = registry.get(args.model).default_metric
    opts = {"population": 128, "children": 128, "generations": 4, **json.loads(args.options)}
    cfg = SearchConfig(model=args.model, nfe=(args.nfe,), metric=metric, n_samples=args.n_samples,
                       n_test_samples=args.n_test, budget=args.budget, method="s3", seed=args.seed, options=opts)
    study = optuna.create_study(direction="minimize")
    t = time.perf_counter()
    result = run_search(cfg, study)
    print(f"{args.model} NFE {args.nfe}, budget {args.budget}, {args.n_samples} search / {args.n_test} "
          f"validation and test samples, {time.perf_counter() - t:.0f} s\n")
    by_hash = {}
    for trial in sorted((t for t in study.get_trials() if t.value is not None), key=lambda t: t.value):
        label = trial.user_attrs.get(ATTR.BASELINE) or trial.user_attrs.get(ATTR.SOURCE, "?")
        by_hash.setdefault(trial.user_attrs[ATTR.HASH],
                           (trial.value, label, schedule_from_json(trial.user_attrs[ATTR.SCHEDULE])))
    validation = study.user_attrs.get("validation", {}).get(str(args.nfe), {})
    evaluator = LocalEvaluator()
    rows = []
    for h, v in validation.items():
        search_value, label, sched = by_hash.get(h, (math.nan, "?", None))
        test = evaluator.evaluate([sched], EvalRequest(args.model, metric, args.n_test, args.seed, "test"))[0].value
        rows.append((v, search_value, test, label))
    print("| validation | search | test | source |\n|---|---|---|---|")
    for v, sv, te, label in sorted(rows, key=lambda r: r[0] if r[0] is not None else math.inf):
        print(f"| {v:.4f} | {sv:.4f} | {te:.4f} | {label} |")
    best_name, best_value = min(result.baselines.items(), key=lambda kv: kv[1])
    print(f"\nwinner: test {result.test_value:.5g}; best baseline {best_name} {best_value:.5g}")


if __name__ == "__main__":
    main()
