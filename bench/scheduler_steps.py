"""S3Scheduler's own time per step, without a network: does a step cost the same at N = 10, 25 and 50?

    OMP_NUM_THREADS=1 python bench/scheduler_steps.py                 # a markdown table
    OMP_NUM_THREADS=1 python bench/scheduler_steps.py --steps 10 25 50 100 --repeats 15 --shape 4 4 64 64
    OMP_NUM_THREADS=1 python bench/scheduler_steps.py --clock wall          # wall time instead of CPU time

The pipeline loop is driven by hand with a fixed model output (the network's cost is not what is measured):
`set_timesteps`, then `step(output, t, sample)` on every listed timestep, on latents of one SD-1.5 batch
(4 x 4 x 64 x 64 float32 by default). Per schedule and N it prints the best over repeats of the scheduler's
time per network call, and the ratio of that figure at the largest N to the smallest: a scheduler whose steps
cost O(1) gives about 1.0, a replay from the start of the run (what S3Scheduler did before its resumable
integrator) grows with N. The schedules are baselines on the vp-discrete process (the default DDPM betas) and,
for the logSNR view of other betas, the same on edm with Stable Diffusion's scaled-linear betas.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from s3search import baselines
from s3search.integrations.diffusers_scheduler import S3Scheduler

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
NAMES = ("ddim", "dpmpp_2m", "unipc_bh2_3", "dpmpp_2m_sde")


def _vp_grid(n: int) -> tuple[float, ...]:
    """n + 1 distinct training steps from 999 down to 10, as vp-discrete times."""
    idx = np.round(np.linspace(999, 10, n + 1)).astype(int)
    return tuple((int(i) + 1) / 1000 for i in idx)


def _edm_grid(n: int) -> tuple[float, ...]:
    # Inside SD's sigma range (0.03 .. 14.6), log-spaced.
    return tuple(float(s) for s in np.exp(np.linspace(np.log(14.0), np.log(0.03), n + 1)))


def schedulers(name: str, n: int) -> dict[str, S3Scheduler]:
    """The schedule at n steps on both processes; a configuration the scheduler refuses is left out (the
    scheduler before the resumable integrator took the DDPM betas only, and is timed on those)."""
    ddpm = baselines.get(name, timesteps=_vp_grid(n), process="vp-discrete")
    sd = baselines.get(name, timesteps=_edm_grid(n), process="edm")
    out = {"vp-discrete, DDPM betas": S3Scheduler(schedule=ddpm.to_dict())}
    try:
        out["edm, SD betas (logSNR view)"] = S3Scheduler(schedule=sd.to_dict(), **SD_BETAS)
    except ValueError:
        pass
    return out


CLOCK = time.thread_time  # --clock wall switches to time.perf_counter (see main)


def one_run(scheduler: S3Scheduler, x_T: torch.Tensor, output: torch.Tensor, seed: int) -> float:
    """(one whole run of steps) / (network calls), in seconds."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps()
    x = x_T * scheduler.init_noise_sigma
    start = CLOCK()
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return (CLOCK() - start) / len(scheduler.timesteps)


def time_per_call(runs: dict[int, S3Scheduler], x_T: torch.Tensor, output: torch.Tensor,
                  repeats: int) -> dict[int, float]:
    """N -> best over repeats of the time per call. The N's take turns within each repeat, so that load on a
    shared machine hits them alike; load only ever adds time, so the best run is the least disturbed one."""
    best = {n: math.inf for n in runs}
    for r in range(repeats + 1):
        for n, scheduler in runs.items():
            seconds = one_run(scheduler, x_T, output, r)
            if r:   # the first round warms caches and the allocator
                best[n] = min(best[n], seconds)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 4, 64, 64])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this thread's CPU time (the default: a shared machine's load lengthens long runs "
                         "more than short ones in wall time, which would tilt the ratio); wall: perf_counter")
    args = ap.parse_args(argv)
    global CLOCK
    if args.clock == "wall":
        CLOCK = time.perf_counter
    torch.set_num_threads(1)
    x_T = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0))
    output = 0.1 * torch.randn(*args.shape, generator=torch.Generator().manual_seed(1))
    steps = sorted(args.steps)
    print(f"S3Scheduler time per network call (no network), latents {tuple(args.shape)} float32, torch "
          f"{torch.__version__}, 1 thread, {args.clock} clock, best of {args.repeats} runs.\n")
    print("| schedule | process | " + " | ".join(f"N={n} us/call" for n in steps)
          + f" | ratio N={steps[-1]} / N={steps[0]} |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    worst = 0.0
    with torch.no_grad():
        for name in NAMES:
            built = {n: schedulers(name, n) for n in steps}
            for label in built[steps[0]]:
                best = time_per_call({n: built[n][label] for n in steps}, x_T, output, args.repeats)
                values = [best[n] for n in steps]
                ratio = values[-1] / values[0]
                worst = max(worst, ratio)
                print(f"| {name} | {label} | " + " | ".join(f"{1e6 * v:.0f}" for v in values) + f" | {ratio:.2f} |")
    print(f"\nworst ratio {worst:.2f} (flat: about 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
