"""Digits test bed: Fréchet distance in the classifier's feature space, sampler by sampler, and evaluation time.

    OMP_NUM_THREADS=1 python bench/digits_fd.py            # prints a markdown table
    OMP_NUM_THREADS=1 python bench/digits_fd.py --n 1000 --seeds 0 1 2 --long-nfe 1000 --grid logsnr

Everything goes through the project's own path: `LocalEvaluator` (x_T from per-sample seeds, the integrator,
the "fd-features" metric with reference statistics of n real digits). The floor is the same metric applied to
n further real digits (drawn with a different seed) instead of samples: what a perfect sampler would score.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from s3search import baselines, grids, metrics
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.evaluation.reference import load_or_compute
from s3search.metrics import MetricContext
from s3search.models import registry


def floor(n: int, seed: int, cache: str) -> float:
    spec = registry.get("digits")
    metric = metrics.get("fd-features")
    ref = load_or_compute(spec, metric, n, seed, "test", root=cache)
    real = spec.reference_sampler(n, torch.Generator().manual_seed(10_000 + seed))
    return metric.compute(real, MetricContext(spec, ref))


def run(name: str, nfe: int, grid: str, n: int, seeds: list[int], evaluator: LocalEvaluator
        ) -> tuple[float, float, float, int, list[float]]:
    if name == "ddim" and nfe > 50:
        ts = grids.get(grid, "edm", nfe - 1)  # N steps + the final D(x_N): N + 1 evaluations
        sched = baselines.get("ddim", ts, "edm")
    else:
        sched = baselines.for_nfe(name, nfe, "edm", grid=grid)
    values, secs = [], []
    for seed in seeds:
        res = evaluator.evaluate([sched], EvalRequest("digits", "fd-features", n, seed=seed, split="test"))[0]
        if not res.ok:
            raise RuntimeError(res.error)
        values.append(res.value)
        secs.append(res.seconds)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.mean(values), sd, statistics.median(secs), sched.nfe, values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--long-nfe", type=int, default=1000)
    ap.add_argument("--grid", default="edm")
    ap.add_argument("--long-seeds", type=int, default=3, help="how many of the seeds the long run uses")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = tempfile.mkdtemp(prefix="digits-ref-")
    evaluator = LocalEvaluator(batch_size=args.n, cache_dir=cache)
    t0 = time.time()
    fl = [floor(args.n, s, cache) for s in args.seeds]
    print(f"| sampler | grid | NFE | FD (mean ± sd over seeds {args.seeds}) | seconds per evaluation |")
    print("|---|---|---|---|---|")
    per_seed = ", ".join(f"{v:.2f}" for v in fl)
    sd_floor = statistics.stdev(fl) if len(fl) > 1 else 0.0
    print(f"| real digits (floor) | - | - | {statistics.mean(fl):.3f} ± {sd_floor:.3f}"
          f" (per seed {per_seed}) | - |")
    rows = [("ddim", args.long_nfe), ("ddim", 50), ("ddim", 10), ("dpmpp_2m", 10), ("unipc_bh2_2", 10),
            ("unipc_bh2_3", 10), ("dpmpp_3m", 10), ("ddim", 5), ("dpmpp_2m", 5)]
    for name, nfe in rows:
        seeds = args.seeds[:args.long_seeds] if nfe > 100 else args.seeds
        mean, sd, secs, real_nfe, values = run(name, nfe, args.grid, args.n, seeds, evaluator)
        sd_text = "" if sd != sd else f" ± {sd:.3f}"
        per = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {args.grid} | {real_nfe} | {mean:.3f}{sd_text} (per seed {per}) | {secs:.2f} |",
              flush=True)
    print(f"\n(total {time.time() - t0:.0f} s; n = {args.n} samples per evaluation; torch threads = 1)")


if __name__ == "__main__":
    main()
