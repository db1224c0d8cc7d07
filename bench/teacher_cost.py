"""The trajectory metric's teacher: one recorded fine run per start against a fine run per end, side by side.

Scores the same schedules (random members of the search space, so their end times differ as a search's do) with
`trajectory`, once with the recorded path (LocalEvaluator, evaluation/teacher.py) and once with a direct fine
run to each schedule's own end (the reference a path replaces), on the same samples; prints the model calls
and wall time of each, and how far apart the two figures are.

    OMP_NUM_THREADS=1 python bench/teacher_cost.py --model digits-t2i --schedules 12 --n-samples 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.evaluation.teacher import fine_schedule
from s3search.integrator import sample
from s3search.metrics.trajectory import trajectory_error
from s3search.models import registry
from s3search.noise import generators_for
from s3search.space import SearchSpace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-t2i")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--schedules", type=int, default=12)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = registry.get(args.model)
    # One start: what a recorded path shares between schedules is their start.
    space = SearchSpace(model.process, args.nfe, options={"t_start_span": 0.0})
    rng = np.random.default_rng(args.seed)
    schedules = [space.random(rng) for _ in range(args.schedules)]
    request = EvalRequest(model=args.model, metric="trajectory", n_samples=args.n_samples, seed=args.seed)

    ev = LocalEvaluator(batch_size=args.n_samples, extras=False)
    ev._models[args.model] = model
    start = time.perf_counter()
    recorded = [r.value for r in ev.evaluate(schedules, request)]
    path_seconds = time.perf_counter() - start

    # The reference a path replaces: a fine run from the same x_T to each (end, final rule), cached as the
    # evaluator cached it before.
    start = time.perf_counter()
    direct, refs = [], {}
    for s in schedules:
        (_, rows, denoiser, _), = ev._batches(model, request)
        gens = generators_for(rows)
        x_T = ev._x_T(model, model.process, s.timesteps[0], gens)
        out = sample(denoiser, x_T, s, gens)
        key = (s.timesteps[-1], s.final)
        if key not in refs:
            refs[key] = sample(denoiser, x_T, fine_schedule(s.process, s.timesteps[0], *key, 200))
        direct.append(trajectory_error(out, refs[key]))
    direct_seconds = time.perf_counter() - start

    ends = {(s.timesteps[-1], s.final) for s in schedules}
    rel = max(abs(a - b) / abs(b) for a, b in zip(recorded, direct))
    print(f"{args.model}: {len(schedules)} schedules at NFE {args.nfe}, {len(ends)} distinct end times, "
          f"{args.n_samples} samples, trajectory")
    print(f"recorded path: {path_seconds:7.1f} s   fine run per end: {direct_seconds:7.1f} s   "
          f"ratio {direct_seconds / path_seconds:.2f}")
    print(f"largest relative difference between the two figures: {rel:.2e}")
    for a, b in zip(recorded, direct):
        print(f"  {a:.6g}  {b:.6g}")


if __name__ == "__main__":
    main()
