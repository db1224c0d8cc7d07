"""One S³ search, then where its true evaluations went: per (source, first-step rule, final rule) after seeding.

    OMP_NUM_THREADS=1 python bench/search_structures.py --model gmm-64d --nfe 5 --seed 2
    OMP_NUM_THREADS=1 python bench/search_structures.py --model gmm-64d --nfe 5 --seed 2 --option niche_within=1.5

Shows whether a search explored the structures (an analytical first step and no final denoise each buy one
more step) or spent its loop in one basin. The defaults are those of the gmm-64d quality benchmark
(docs/bench/search.md): 10000 samples a search evaluation, 20000 for validation and test, population 128,
4 generations. In-memory study, the real LocalEvaluator.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3search.search.run import run_search  # noqa: E402
from s3search.search.study import ATTR  # noqa: E402
from search_bench import _curve, add_one_search_arguments, one_search_config  # noqa: E402  (bench/ on the path)

SEED_SOURCES = ("baseline", "variant", "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_one_search_arguments(ap)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = one_search_config(args)
    study = optuna.create_study(direction="minimize")
    res = run_search(config, study)

    trials = [t for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
              if ATTR.SCHEDULE in t.user_attrs]
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for t in trials:
        doc = json.loads(t.user_attrs[ATTR.SCHEDULE])
        value = t.value if t.value is not None else math.inf
        source = t.user_attrs.get(ATTR.SOURCE, "?")
        groups[(source if source not in SEED_SOURCES else "seeding", doc.get("first_step", "named"),
                doc.get("final", "denoise"))].append(value)
    print(f"{args.model} NFE {args.nfe} seed {args.seed} options {json.dumps(dict(args.option))}: "
          f"{len(trials)} evaluations; search {res.best_value:.4g}, validation {res.validation_value:.4g}, "
          f"test {res.test_value:.4g}")
    print("| source | first step | final | evaluations | best | median |")
    print("|---|---|---|---|---|---|")
    for (source, first, final), vals in sorted(groups.items()):
        vals.sort()
        print(f"| {source} | {first} | {final} | {len(vals)} | {vals[0]:.4g} | {vals[len(vals) // 2]:.4g} |")
    curve = _curve(study)
    marks = [i for i in (49, 99, 149, 199, len(curve) - 1) if i < len(curve)]
    print("best so far: " + ", ".join(f"{i + 1}: {curve[i]:.4g}" for i in dict.fromkeys(marks)))


if __name__ == "__main__":
    main()
