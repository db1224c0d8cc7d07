"""How much a metric moves with the seeds alone: one schedule scored on several test-split seeds per sample count.

The search benchmark's excess ratios are differences of such scores; this sets the sample counts they need.

    OMP_NUM_THREADS=1 python bench/metric_noise.py --model gmm-64d --nfe 5 --baselines ipndm,dpmpp_2m \
        --grid ays-sdxl --n 3000,5000,20000 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3search.evaluation.base import EvalRequest  # noqa: E402
from s3search.evaluation.local import LocalEvaluator  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.search.baselines_seed import on_grids  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--metric", default=None)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--baselines", default="ipndm,dpmpp_2m")
    ap.add_argument("--grid", default="ays-sdxl")
    ap.add_argument("--n", type=_ints, default=[3000, 5000, 20000])
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    spec = registry.get(args.model)
    metric = args.metric or spec.default_metric
    cands = on_grids(args.baselines.split(","), args.nfe, spec.process.name, grid_names=(args.grid,))
    if not cands:
        raise SystemExit(f"none of {args.baselines} reaches NFE {args.nfe} on {args.grid}")
    ev = LocalEvaluator()
    print(f"{args.model}, {metric}, NFE {args.nfe}, test split, seeds {args.seeds}")
    print("| schedule | samples | values | mean | sd | s |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        for c in cands:
            t = time.perf_counter()
            vals = [ev.evaluate([c.schedule], EvalRequest(args.model, metric, n, s, "test"))[0].value
                    for s in args.seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            print(f"| {c.label} | {n} | {' '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(vals):.4f} | "
                  f"{sd:.4f} | {time.perf_counter() - t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
