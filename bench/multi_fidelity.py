"""Multi-fidelity search against full-fidelity S³ (issue 19 item 2), side by side with the same seeds.

Per seed: S³ with `--budget` full evaluations, then S³ with `options.fidelity` (low-fidelity scores on the first
`--low-samples` samples of the search split, the best `--keep` share of each batch evaluated in full) and
`options.budget_calls` set to `--call-share` of the model calls the full search spent, and with `--same-calls`
full-fidelity S³ on the calls the multi-fidelity search spent (what the fidelity adds over a smaller budget). Prints one row per
(seed, arm): the winner's test value, the best baseline's test value, model calls (search evaluations only;
validation and test are the same for both arms and not counted), full and low-fidelity evaluations; then per
seed and on average the ratio of the multi-fidelity test value and calls to the full search's.

    OMP_NUM_THREADS=1 python bench/multi_fidelity.py --model gmm-64d --nfe 5 --seeds 0,1,2 --same-calls \
        --mf-options '{"refine_arms": 5, "refine_share": 0.25}'
    OMP_NUM_THREADS=1 python bench/multi_fidelity.py --model digits-t2i --nfe 5 --seeds 0 --n-samples 500 \\
        --low-samples 50 --n-test-samples 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_one(arm: str, args: argparse.Namespace, seed: int, budget_calls: Optional[int]) -> dict[str, Any]:
    options: dict[str, Any] = {"budget_calls": budget_calls} if arm == "full-same-calls" else {}
    if arm == "multi-fidelity":
        options = {**json.loads(args.mf_options),
                   "fidelity": {"low_samples": args.low_samples, "keep": args.keep, "seed_keep": args.seed_keep},
                   "budget_calls": budget_calls}
    config = SearchConfig(model=args.model, nfe=(args.nfe,), budget=args.budget, seed=seed, metric=args.metric,
                          n_samples=args.n_samples, n_test_samples=args.n_test_samples, options=options)
    study = optuna.create_study(direction="minimize")
    start = time.perf_counter()
    result = run_search(config, study)
    best_base = min((v for v in result.baselines.values() if math.isfinite(v)), default=math.inf)
    return {"arm": arm, "seed": seed, "test": result.test_value, "best_baseline": best_base,
            "calls": result.model_calls, "full": result.evaluations, "low": result.low_evaluations,
            "winner": result.winner_source, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--metric", default=None)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=200, help="full evaluations of the full-fidelity search")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-test-samples", type=int, default=5000)
    ap.add_argument("--low-samples", type=int, default=100)
    ap.add_argument("--keep", type=float, default=1 / 3)
    ap.add_argument("--seed-keep", type=float, default=1 / 9)
    ap.add_argument("--mf-options", default="{}", help="other search options of the multi-fidelity arm (JSON)")
    ap.add_argument("--same-calls", action="store_true",
                    help="also run full-fidelity S3 on the model calls the multi-fidelity search spent")
    ap.add_argument("--call-share", type=float, default=1 / 3,
                    help="the multi-fidelity search's call budget as a share of the full search's calls")
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        print(f"seed {seed}: full-fidelity S3, budget {args.budget} ...", file=sys.stderr, flush=True)
        full = run_one("full", args, seed, None)
        print(json.dumps(full), file=sys.stderr, flush=True)
        calls = int(args.call_share * full["calls"])
        print(f"seed {seed}: multi-fidelity S3, {calls} model calls ...", file=sys.stderr, flush=True)
        mf = run_one("multi-fidelity", args, seed, calls)
        print(json.dumps(mf), file=sys.stderr, flush=True)
        rows += [full, mf]
        if args.same_calls:
            print(f"seed {seed}: full-fidelity S3 on the same {mf['calls']} model calls ...", file=sys.stderr,
                  flush=True)
            small = run_one("full-same-calls", args, seed, max(mf["calls"], args.n_samples * args.nfe))
            print(json.dumps(small), file=sys.stderr, flush=True)
            rows.append(small)
    print(f"{args.model}, NFE {args.nfe}, {args.n_samples} search / {args.n_test_samples} test samples; "
          f"multi-fidelity: {args.low_samples} low-fidelity samples, keep {args.keep:.3g}, seed_keep "
          f"{args.seed_keep:.3g}, options {args.mf_options}, "
          f"{args.call_share:.3g} of the full search's model calls; test split, lower is better")
    print("| seed | arm | test | best baseline (test) | model calls | full evaluations | low-fidelity | "
          "winner from | s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['arm']} | {r['test']:.4f} | {r['best_baseline']:.4f} | {r['calls']:,} | "
              f"{r['full']} | {r['low']} | {r['winner']} | {r['seconds']:.0f} |")
    ratios, call_ratios = [], []
    for seed in sorted({r["seed"] for r in rows}):
        full, mf = (next(r for r in rows if r["seed"] == seed and r["arm"] == a) for a in ("full", "multi-fidelity"))
        ratios.append(mf["test"] / full["test"])
        call_ratios.append(mf["calls"] / full["calls"])
        line = f"seed {seed}: multi-fidelity test / full test {ratios[-1]:.3f}; model calls {call_ratios[-1]:.3f}"
        small = next((r for r in rows if r["seed"] == seed and r["arm"] == "full-same-calls"), None)
        if small is not None:
            line += f"; full-fidelity on the same calls / full test {small['test'] / full['test']:.3f}"
        print(line)
    n = len(ratios)
    geo = math.exp(sum(math.log(x) for x in ratios) / n) if n and all(x > 0 for x in ratios) else math.nan
    means = [sum(r["test"] for r in rows if r["arm"] == a) / n for a in ("full", "multi-fidelity")]
    print(f"mean test: full {means[0]:.4f}, multi-fidelity {means[1]:.4f}; test ratio geomean {geo:.3f}; "
          f"model calls ratio max {max(call_ratios):.3f}")


if __name__ == "__main__":
    main()
