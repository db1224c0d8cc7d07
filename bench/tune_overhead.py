"""Why the evaluator uses Ray actors, not Ray Tune: per-evaluation cost of each on trivial work.

    OMP_NUM_THREADS=1 python bench/tune_overhead.py --n 40

Both run n and then 3n evaluations that do nothing (a closed-form toy score), 2 at a time, on one embedded Ray;
the difference per extra evaluation is the marginal cost, free of fixed start-up. Tune runs with
reuse_actors=True, its cheapest setting; the RayEvaluator's actors are started once, outside the timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
from ray import tune

from s3search.distributed import RayEvaluator, RaySettings
from s3search.distributed.toy import toy_score
from s3search.evaluation.base import EvalRequest
from s3search.schedule import SolverSchedule, StepSpec


def cands(n: int) -> list[SolverSchedule]:
    return [SolverSchedule(process="edm", timesteps=(80.0, 10.0 / (1 + k), 0.002), steps=(StepSpec(), StepSpec()),
                           name=f"t{k}") for k in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)

    def trainable(config: dict) -> dict:
        return {"score": toy_score(SolverSchedule.from_json(config["schedule"]))}

    def tune_fit(scheds: list[SolverSchedule]) -> float:
        t0 = time.perf_counter()
        tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                   param_space={"schedule": tune.grid_search([s.to_json() for s in scheds])},
                   tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
                   run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(), verbose=0)).fit()
        return time.perf_counter() - t0

    small, large = cands(args.n), cands(3 * args.n)
    tune_small, tune_large = tune_fit(small), tune_fit(large)

    request = EvalRequest(model="toy", metric="toy", n_samples=2)
    settings = RaySettings(max_in_flight=2, batch_size=1)
    with RayEvaluator(settings, factory="s3search.distributed.toy:ToyEvaluator") as ev:
        t0 = time.perf_counter()
        ray.get([a.ping.remote() for a in ev.start()._actors])
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev.evaluate(small, request)
        act_small = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev.evaluate(large, request)
        act_large = time.perf_counter() - t0
    ray.shutdown()
    extra = 2 * args.n
    print(f"trivial evaluations, 2 at a time, embedded Ray {ray.__version__}, n = {args.n} and {3 * args.n}:")
    print(f"  Ray Tune (reuse_actors=True): {tune_small:.1f} s and {tune_large:.1f} s; "
          f"{1e3 * (tune_large - tune_small) / extra:.1f} ms per extra evaluation")
    print(f"  RayEvaluator (batch 1):       {act_small:.2f} s and {act_large:.2f} s after a {start_s:.1f} s actor "
          f"start; {1e3 * (act_large - act_small) / extra:.1f} ms per extra evaluation")


if __name__ == "__main__":
    main()
