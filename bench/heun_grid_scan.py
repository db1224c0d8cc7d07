"""How much room a flow model leaves around Heun at NFE 5: Heun's grid scanned, against other step structures.

At NFE 5 Heun (`flow_heun`) takes two steps, t_0 -> t_1 -> t_2 with every evaluation at a corrected point. This
scores it with t_1 moved along the flow-time axis and t_2 moved up, and scores the other 5-evaluation structures
of the schedule space built from the same trapezoidal rule (the `unic` corrector, which skips the evaluation at
the corrected point, on more steps) and first-order UniC, all on the same search-split samples.

    OMP_NUM_THREADS=1 python bench/heun_grid_scan.py --model digits-t2i-flow --metric fd-per-digit --seed 1
"""

from __future__ import annotations

import argparse
import time

import torch

from s3search import SolverSchedule, StepSpec, baselines, grids, processes
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator

HEUN = StepSpec(derivative="trapezoid", corrector="implicit")
TRAPEZOID_UNIC = StepSpec(derivative="trapezoid", corrector="unic")


def candidates(t_start: float, t_end: float) -> dict[str, SolverSchedule]:
    proc = processes.get("flow")

    def grid(kind: str, n: int) -> tuple[float, ...]:
        return tuple(grids.get(kind, "flow", n, t_start, t_end)) if kind != "logsnr" \
            else tuple(grids.logsnr(proc, n, t_start, t_end))

    def schedule(ts, steps) -> SolverSchedule:
        return SolverSchedule(process="flow", timesteps=tuple(ts), steps=tuple(steps))

    out = {"flow_heun@logsnr": baselines.get("flow_heun", grid("logsnr", 2), "flow")}
    for mid in (0.35, 0.42, 0.46, 0.54, 0.58, 0.65):
        out[f"flow_heun, t_1 = {mid}"] = schedule((t_start, mid, t_end), (HEUN, HEUN))
    mid = grid("logsnr", 2)[1]
    for end in (0.003, 0.01):
        out[f"flow_heun, t_2 = {end}"] = schedule((t_start, mid, end), (HEUN, HEUN))
    for kind in ("logsnr", "time-uniform"):
        out[f"Heun, then 2 trapezoid-unic @{kind}"] = schedule(grid(kind, 3), (HEUN, TRAPEZOID_UNIC, TRAPEZOID_UNIC))
        out[f"4 trapezoid-unic @{kind}"] = schedule(grid(kind, 4), (TRAPEZOID_UNIC,) * 4)
    out["4 UniC-1 (taylor) @logsnr"] = schedule(grid("logsnr", 4), (StepSpec(corrector="unic"),) * 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-t2i-flow")
    ap.add_argument("--metric", default="fd-per-digit")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--split", default="search")
    ap.add_argument("--t-start", type=float, default=0.999)
    ap.add_argument("--t-end", type=float, default=0.001)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cands = candidates(args.t_start, args.t_end)
    for name, s in cands.items():
        assert s.nfe == 5, (name, s.nfe)
    request = EvalRequest(model=args.model, metric=args.metric, n_samples=args.n_samples, seed=args.seed,
                          split=args.split)
    start = time.perf_counter()
    results = LocalEvaluator(extras=False).evaluate(list(cands.values()), request)
    print(f"{args.model}, {args.metric}, NFE 5, {args.split} split, {args.n_samples} samples, seed {args.seed} "
          f"({time.perf_counter() - start:.0f} s)")
    reference = results[0].value
    for (name, s), r in zip(cands.items(), results):
        times = ", ".join(f"{t:.4g}" for t in s.timesteps)
        print(f"  {name:40s} {r.value:9.3f}  {r.value / reference:6.3f}x   times {times}  {r.error or ''}")


if __name__ == "__main__":
    main()
