"""Baselines on the built-in Gaussian mixtures: metric at NFE 3..10, a 1000-step value and the true-vs-true floor.

    OMP_NUM_THREADS=1 python bench/mixture_baselines.py [--n 2000] [--models gmm-8x8 ...] > table.md

Prints one markdown table per model (search split, seed 0, logSNR grid) with the mean evaluation time per
candidate. "floor" is the metric of exact samples of the target (same n, a seed no evaluation uses); for NLL it
is the Monte-Carlo entropy H(p*). Nothing here is hard-coded: every figure printed is measured by this run.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from s3search import baselines, metrics, processes
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.evaluation.reference import load_or_compute
from s3search.models import registry

DEFAULT_MODELS = ("gmm-8x8", "gmm-8x4", "gmm-6x6", "gmm-64d", "gmm-64d-vp", "gmm-image")
DEFAULT_BASELINES = ("ddim", "dpmpp_2m", "unipc_bh2_3", "dpmpp_2m_sde")


def floor_value(model_name: str, metric_name: str, n: int, ev: LocalEvaluator) -> float:
    model = registry.get(model_name)
    metric = metrics.get(metric_name)
    ref = load_or_compute(model, metric, n, 0, "search", root=ev.cache_dir) if metric.needs_reference else {}
    exact = model.exact.sample(n, torch.Generator().manual_seed(987_654_321))
    return metric.compute(exact, metrics.MetricContext(model, ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--baselines", nargs="+", default=list(DEFAULT_BASELINES))
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 4, 5, 6, 8, 10])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--metric", default=None, help="override each model's default metric")
    ap.add_argument("--fine-steps", type=int, default=1000)
    ap.add_argument("--grid", default="logsnr")
    args = ap.parse_args()

    ev = LocalEvaluator(cache_dir=tempfile.mkdtemp(prefix="s3search-bench-"), batch_size=1024)
    print(f"<!-- torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, n={args.n}, grid={args.grid} -->")
    for name in args.models:
        model = registry.get(name)
        metric = args.metric or model.default_metric
        req = EvalRequest(name, metric, args.n, seed=0, split="search")
        process = model.process.name
        print(f"\n### {name} ({process}), metric `{metric}`, n = {args.n}\n")
        print("| baseline | " + " | ".join(f"NFE {k}" for k in args.nfe) + f" | {args.fine_steps} steps | s / candidate |")
        print("|---|" + "---|" * (len(args.nfe) + 2))
        for b in args.baselines:
            row, secs = [], []
            for k in args.nfe:
                try:
                    sched = baselines.for_nfe(b, k, process, grid=args.grid)
                except ValueError:
                    row.append("—")
                    continue
                (res,) = ev.evaluate([sched], req)
                row.append(f"{res.value:.4g}" if res.ok else "error")
                secs.append(res.seconds)
            ts_fine = baselines.for_nfe("dpmpp_2m", args.fine_steps, process, grid=args.grid) if b == "dpmpp_2m" \
                else None
            fine = ""
            if ts_fine is not None:
                start = time.perf_counter()
                (res,) = ev.evaluate([ts_fine], req)
                fine = f"{res.value:.4g} ({time.perf_counter() - start:.0f} s)"
            mean_s = sum(secs) / len(secs) if secs else float("nan")
            print(f"| {b} | " + " | ".join(row) + f" | {fine} | {mean_s:.2f} |")
        print(f"\nfloor (exact samples of the target, same n): {floor_value(name, metric, args.n, ev):.4g}")


if __name__ == "__main__":
    main()
