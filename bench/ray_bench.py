"""Evaluations per minute on Ray with 1 and 2 workers, and Ray's overhead per evaluation.

    OMP_NUM_THREADS=1 python bench/ray_bench.py                       # toy evaluator, CPU-bound, ~0.5 s each
    OMP_NUM_THREADS=1 python bench/ray_bench.py --factory s3search.evaluation.local:LocalEvaluator \
        --model gmm-64d --metric fd --n-samples 1000                  # the real evaluation path

Overhead of one worker = (driver wall time - time inside the evaluator) / time inside the evaluator: everything
Ray adds (task submission, JSON transfer, scheduling, result fetch). With w workers the same sum is taken over
worker-time (w x wall), so it also counts idle workers at the end of a round. Batches are timed after a warm-up
round, so actor start-up and the model load (paid once per worker) are reported separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import Any

import ray
import torch

from s3search import processes
from s3search.distributed import RayEvaluator, RaySettings
from s3search.evaluation.base import EvalRequest
from s3search.distributed.ray_evaluator import load_factory
from s3search.schedule import SolverSchedule, StepSpec


def candidates(process: str, nfe: int, count: int, seed: int) -> list[SolverSchedule]:
    """Valid random schedules: warped log-sigma grids with random orders, for any registered process."""
    proc = processes.get(process)
    rng = random.Random(seed)
    sig_hi = min(proc.sigma_ve(proc.t_max * (1 - 1e-6)) if proc.t_max > 0 else 80.0, 80.0)
    sig_lo = max(proc.sigma_ve(proc.t_min) if proc.sigma(proc.t_min) > 0 else 0.002, 0.002)
    out = []
    for k in range(count):
        warp = rng.uniform(0.6, 1.6)
        sig = [math.exp(math.log(sig_hi) + (i / (nfe - 1)) ** warp * (math.log(sig_lo) - math.log(sig_hi)))
               for i in range(nfe)]
        ts = tuple(proc.t_of_sigma_ve(s) for s in sig)
        steps = tuple(StepSpec(order=rng.randint(1, min(3, i + 1)), eta=rng.choice([0.0, 0.0, 0.5]))
                      for i in range(nfe - 1))
        out.append(SolverSchedule(process=process, timesteps=ts, steps=steps, name=f"b{k}"))
    return out


def calibrate_toy(target_s: float) -> int:
    from s3search.distributed.toy import _burn

    _burn(50)
    t0 = time.perf_counter()
    _burn(200)
    per = (time.perf_counter() - t0) / 200
    return max(1, round(target_s / per))


def run_ray(factory: str, kwargs: dict[str, Any], cands: list[SolverSchedule], request: EvalRequest,
            workers: int, batch_size: int) -> dict[str, float]:
    ev = RayEvaluator(RaySettings(max_in_flight=workers, batch_size=batch_size), factory=factory,
                      factory_kwargs=kwargs)
    t0 = time.perf_counter()
    ev.start()
    ray.get([a.ping.remote() for a in ev._actors])
    startup = time.perf_counter() - t0
    # Warm-up: one candidate per worker loads the model in each actor.
    ev.evaluate(cands[:workers], request)
    warm = time.perf_counter() - t0 - startup
    ev.stats.wall_seconds = 0.0
    inside0 = ev.stats.eval_seconds
    batch = ev.batch_size_for(len(cands))
    res = ev.evaluate(cands, request)
    wall, inside = ev.stats.wall_seconds, ev.stats.eval_seconds - inside0
    ev.close()
    failed = sum(not r.ok for r in res)
    return {"workers": workers, "batch": batch, "wall_s": wall,
            "evals_per_min": 60 * len(cands) / wall, "eval_s_mean": inside / len(cands),
            "overhead_frac": (workers * wall - inside) / inside,
            "overhead_ms_per_eval": 1e3 * (workers * wall - inside) / len(cands),
            "startup_s": startup, "warmup_s": warm, "failed": failed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factory", default="s3search.distributed.toy:ToyEvaluator")
    p.add_argument("--kwargs", default="", help="JSON keyword arguments of the factory")
    p.add_argument("--eval-s", type=float, default=0.5, help="toy only: target seconds of CPU work per evaluation")
    p.add_argument("--model", default="toy")
    p.add_argument("--metric", default="toy")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--process", default="", help="process of the candidates (default: the model's, or edm)")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--candidates", type=int, default=24)
    p.add_argument("--json", default="", help="also write the measurements here")
    args = p.parse_args()

    torch.set_num_threads(1)
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    toy = args.factory.endswith(":ToyEvaluator")
    if toy and "work" not in kwargs and "sleep_s" not in kwargs:
        kwargs["work"] = calibrate_toy(args.eval_s)
    process = args.process or ("edm" if toy else _model_process(args.model))
    cands = candidates(process, args.nfe, args.candidates, seed=1)
    request = EvalRequest(model=args.model, metric=args.metric, n_samples=args.n_samples, seed=0)

    # In-process baseline: the same evaluator, no Ray (after one warm-up evaluation).
    local = load_factory(args.factory)(**kwargs)
    local.evaluate(cands[:1], request)
    t0 = time.perf_counter()
    local_res = local.evaluate(cands, request)
    local_wall = time.perf_counter() - t0

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    rows = [run_ray(args.factory, kwargs, cands, request, w, b) for w, b in ((1, 1), (1, 0), (2, 1), (2, 0))]
    ray.shutdown()

    print(f"# ray_bench: factory={args.factory} kwargs={json.dumps(kwargs)} model={args.model} "
          f"metric={args.metric} n_samples={args.n_samples} candidates={len(cands)} nfe={args.nfe}")
    print(f"# host: {os.cpu_count()} CPUs, load average at end {os.getloadavg()[0]:.2f}; ray {ray.__version__}")
    print(f"local (no Ray): {60 * len(cands) / local_wall:.1f} evals/min, {local_wall / len(cands):.3f} s/eval, "
          f"{sum(not r.ok for r in local_res)} failed")
    print("| workers | batch | evals/min | s/eval inside | Ray overhead | ms/eval | actor start s | warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['batch']} | {r['evals_per_min']:.1f} | {r['eval_s_mean']:.3f} | "
              f"{100 * r['overhead_frac']:.1f}% | {r['overhead_ms_per_eval']:.1f} | {r['startup_s']:.2f} | "
              f"{r['warmup_s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"local_wall_s": local_wall, "rows": rows, "kwargs": kwargs}, f, indent=1)


def _model_process(model: str) -> str:
    from s3search.models import registry

    return registry.get(model).process.name


if __name__ == "__main__":
    main()
