"""Cheap objectives against the real one (issue 17 item 4): do `trajectory` and `prompt-accuracy` rank schedules
as the class-balanced feature FD (`fd-per-digit`) does?

Takes the evaluated schedules of earlier studies (every finite trial, baselines included), scores each again on
the same split and samples with each metric, and prints Kendall's tau between every cheap metric and FD, with
each metric's evaluation time. With `--winners`, it also test-scores the winners of searches run on different
metrics (their results documents) with FD, to show whether a schedule searched on a cheap metric keeps its lead on FD.

    OMP_NUM_THREADS=1 python bench/cheap_objective.py --storage sqlite:///t2i.db \
        --studies digits-t2i-flow-nfe5-s3-fd-per-digit-seed0 --n-samples 500
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import kendalltau

from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.search.study import ATTR, chash, schedule_from_json

CHEAP = ("trajectory", "prompt-accuracy")
REAL = "fd-per-digit"


def study_schedules(storage: str, names: list[str]) -> tuple[str, list]:
    """The model and the distinct evaluated schedules of the studies (finite values only)."""
    model, out, seen = None, [], set()
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        model = model or study.user_attrs.get("model")
        for t in study.trials:
            if t.value is None or not math.isfinite(t.value) or ATTR.SCHEDULE not in t.user_attrs:
                continue
            s = schedule_from_json(t.user_attrs[ATTR.SCHEDULE])
            if chash(s) not in seen:
                seen.add(chash(s))
                out.append(s)
    if model is None:
        raise SystemExit(f"none of {names} records its model")
    return model, out


def score(ev: LocalEvaluator, schedules: list, request: EvalRequest) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    values = np.array([r.value for r in ev.evaluate(schedules, request)])
    return values, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--studies", nargs="+", required=True)
    ap.add_argument("--n-samples", type=int, default=500)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--winners", nargs="*", default=[], help="results documents (results/<study>.json) whose "
                    "winners are test-scored with FD, with the best baseline of an FD search's document")
    ap.add_argument("--n-test", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    model, schedules = study_schedules(args.storage, args.studies)
    ev = LocalEvaluator(extras=False)
    print(f"{model}: {len(schedules)} distinct evaluated schedules of {len(args.studies)} studies, "
          f"{args.split} split, {args.n_samples} samples, guidance {args.guidance_scale or 'the model default'}")
    table = {}
    for metric in (REAL, *CHEAP):
        request = EvalRequest(model=model, metric=metric, n_samples=args.n_samples, seed=args.seed,
                              split=args.split, guidance_scale=args.guidance_scale)
        table[metric], seconds = score(ev, schedules, request)
        print(f"  {metric:16s} {seconds:7.1f} s for all ({seconds / len(schedules):.2f} s a schedule)", flush=True)
    real = table[REAL]
    for metric in CHEAP:
        ok = np.isfinite(real) & np.isfinite(table[metric])
        tau = kendalltau(table[metric][ok], real[ok]).statistic
        top = np.argsort(real[ok])[: max(5, ok.sum() // 10)]
        tau_top = kendalltau(table[metric][ok][top], real[ok][top]).statistic
        print(f"Kendall tau, {metric} vs {REAL}: {tau:.3f} over {ok.sum()} schedules; "
              f"{tau_top:.3f} among the best tenth by {REAL}")

    if args.winners:
        rows = []
        for path in args.winners:
            doc = json.loads(Path(path).read_text())
            rows.append((f"searched on {doc['metric']} ({doc['study']})", doc["runs"][0]["schedule"]))
            if doc["metric"] == REAL:
                best = min(doc["baselines"], key=lambda b: b["value"])
                rows.append((f"best baseline on {REAL}: {best['name']}@{best['grid']}", best["schedule"]))
        request = EvalRequest(model=model, metric=REAL, n_samples=args.n_test, seed=args.seed, split="test",
                              guidance_scale=args.guidance_scale)
        results = ev.evaluate([schedule_from_json(json.dumps(s)) for _, s in rows], request)
        print(f"{REAL} on the test split, {args.n_test} samples, one run:")
        for (label, _), r in zip(rows, results):
            print(f"  {r.value:10.4g}  {label}")

if __name__ == "__main__":
    main()
