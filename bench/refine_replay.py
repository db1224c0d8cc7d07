"""How much of a search result is the draw of its grid refinement: replay the refinement of one search.

    OMP_NUM_THREADS=1 python bench/refine_replay.py --nfe 5 --seed 2 --draws 3 \\
        --yardstick-from docs/bench/search_quality_gmm-64d-r8-n10k-seed2.json \\
        --policy '{}' --policy '{"refine_arms": 3}' --policy '{"refine_share": 0.5, "refine_arms": 3}'

Runs one S³ search with the quality benchmark's settings (or reads it back from --storage / --study), then, for
each refinement policy (search options), takes the search's first `budget - refine_share x budget` trials (the
loop is deterministic, so this is where that policy's loop would have stopped) and runs the real `refine_grid`
on them `--draws` times with different CMA-ES seeds, followed by the real validation choice and the test
evaluation. Prints search / validation / test value and the test excess ratio per draw and their mean: the
spread a single quality run samples one point of. Each replay holds its own in-memory copy of the trials.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3search.models import registry  # noqa: E402
from s3search.search.context import SearchContext  # noqa: E402
from s3search.search.refine import refine_budget, refine_grid  # noqa: E402
from s3search.search.run import (_test_scores, _validated_best, build_space,  # noqa: E402
                                 default_evaluator, run_search)
from s3search.search.study import Ledger  # noqa: E402
from s3search.evaluation.base import EvalRequest  # noqa: E402
from search_bench import (_yardstick, add_one_search_arguments, excess_ratio,  # noqa: E402  (bench/ is on the path)
                          one_search_config)


def _searched_study(args) -> optuna.Study:
    study = optuna.create_study(direction="minimize", storage=args.storage, study_name=args.study,
                                load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        t0 = time.time()
        res = run_search(one_search_config(args), study)
        print(f"search: {res.evaluations} evaluations, search {res.best_value:.4g}, validation "
              f"{res.validation_value:.4g}, test {res.test_value:.4g} ({time.time() - t0:.0f} s)", flush=True)
    return study


def replay(args, trials: list, policy: dict, draw: int) -> tuple[float, float, float]:
    """(search, validation, test) value of the winner after one refinement draw under `policy`."""
    config = one_search_config(args, **policy)
    options = config.options
    model = registry.get(config.model)
    keep = refine_budget(options, config.budget)
    study = optuna.create_study(direction="minimize")
    for t in trials[: config.budget - keep]:
        study.add_trial(t)
    ledger = Ledger(study, default_evaluator(options),
                    config.eval_request(config.n_samples, "search"))
    ledger.load()
    space = build_space(config, model.process.name, options,
                        has_data_mean=getattr(model.denoiser, "data_mean", None) is not None)
    ctx = SearchContext(config=config, options=options, space=space, ledger=ledger,
                        rng=np.random.default_rng([config.seed, ledger.count, draw]),
                        budgets={args.nfe: config.budget})
    refine_grid(ctx, args.nfe)
    best, validation = _validated_best(ctx, study, args.nfe)
    test, _, _ = _test_scores(ctx, study, args.nfe, best.schedule, {})
    return best.value, validation, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_search_arguments(ap)
    ap.add_argument("--policy", action="append", type=json.loads, metavar="JSON",
                    help="refinement options of one replay policy (repeatable; default: {} = the defaults)")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--yardstick-from", help="a quality run's JSON: its reference and best baseline at this NFE "
                                             "give the excess ratio")
    ap.add_argument("--storage", help="Optuna storage URL to keep (or read back) the search")
    ap.add_argument("--study", default="replay")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ratio = lambda v: math.nan   # noqa: E731
    if args.yardstick_from:
        doc = json.loads(Path(args.yardstick_from).read_text())
        name, base = _yardstick(doc["runs"][str(args.nfe)])
        ratio = lambda v: excess_ratio(v, base, doc["reference"])   # noqa: E731
        print(f"yardstick: {name} {base:.4g}, 1000-step value {doc['reference']:.4g}")
    trials = sorted(_searched_study(args).get_trials(deepcopy=False), key=lambda t: t.number)
    for policy in args.policy or [{}]:
        rows = []
        for draw in range(args.draws):
            t0 = time.time()
            rows.append(replay(args, trials, policy, draw))
            s, v, t = rows[-1]
            print(f"{json.dumps(policy)} draw {draw}: search {s:.4f} validation {v:.4f} test {t:.4f} "
                  f"ratio {ratio(t):.3f} ({time.time() - t0:.0f} s)", flush=True)
        mean = np.mean(rows, axis=0)
        ratios = [ratio(t) for _, _, t in rows]
        print(f"{json.dumps(policy)}: mean search {mean[0]:.4f} test {mean[2]:.4f}; ratio mean {np.mean(ratios):.3f}"
              f" (min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)


if __name__ == "__main__":
    main()
