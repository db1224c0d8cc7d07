"""Align Your Steps grids against their initial EDM (Karras, rho = 7) grid, with the same solvers.

For each test bed and NFE: one KLUB optimisation per arm from the EDM grid (steps = NFE - 1, the solvers' final
denoise being the last evaluation), then every solver on the EDM grid and on each arm's grid, scored with the
model's own metric on held-out seeds (the test split). Arms:
  default   the settings of `s3search ays` (ays.AYSSettings())
  long      the same with 4x the iterations (how much the stopping rule matters)
  no-floor  sigma_floor 0 (the plain KLUB), the default iterations
  no-floor-long  sigma_floor 0 with 4x the iterations (the KLUB minimiser itself)

    python bench/ays_grids.py --models gmm-64d,gmm-8x8,digits --nfe 4,5,6
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from s3search import ays, baselines, grids
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.models import registry
from s3search.search import baselines_seed


def arms(base: ays.AYSSettings, only: list[str]) -> dict[str, ays.AYSSettings]:
    table = {"default": base, "long": dataclasses.replace(base, iterations=4 * base.iterations),
             "no-floor": dataclasses.replace(base, sigma_floor=0.0),
             "no-floor-long": dataclasses.replace(base, sigma_floor=0.0, iterations=4 * base.iterations)}
    return {k: table[k] for k in only}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gmm-64d,gmm-8x8,digits")
    p.add_argument("--nfe", default="4,5,6")
    p.add_argument("--solvers", default="ddim,dpmpp_2m,ipndm,ddim_eta1")
    p.add_argument("--arms", default="default,long,no-floor,no-floor-long")
    p.add_argument("--n-eval", type=int, default=4000, help="samples per evaluation (test split)")
    p.add_argument("--eval-seed", type=int, default=7)
    a = p.parse_args()
    solvers = a.solvers.split(",")
    ev = LocalEvaluator()
    print("| test bed | NFE | grid | " + " | ".join(solvers) + " | grid sigmas | AYS seconds |")
    print("|---|---|---|" + "---|" * len(solvers) + "---|---|")
    for model in a.models.split(","):
        spec = registry.get(model)
        proc = spec.process
        req = EvalRequest(model=model, metric=spec.default_metric, n_samples=a.n_eval, seed=a.eval_seed,
                          split="test")
        for nfe in (int(v) for v in a.nfe.split(",")):
            n = baselines_seed.ays_steps(nfe, proc.name)
            rows = {"edm": (grids.get("edm", proc, n), 0.0)}
            for name, settings in arms(ays.AYSSettings(), a.arms.split(",")).items():
                start = time.perf_counter()
                res = baselines_seed.ays_result(model, nfe, settings=settings)
                rows[name] = (res.timesteps, time.perf_counter() - start)
            for name, (ts, secs) in rows.items():
                scheds = [baselines.get(s, ts, proc.name) for s in solvers]
                vals = [r.value if r.ok else float("nan") for r in ev.evaluate(scheds, req)]
                sig = " ".join(f"{proc.sigma_ve(t):.3g}" for t in ts)
                print(f"| {model} ({spec.default_metric}) | {nfe} | {name} | "
                      + " | ".join(f"{v:.4g}" for v in vals) + f" | {sig} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
