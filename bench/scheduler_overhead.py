"""Overhead of running a schedule through S3Scheduler in a DDPMPipeline, against `sample` and a stock scheduler.

S3Scheduler drives the same resumable integrator as `sample` (integrator.Integration: O(1) work a step, no extra
model calls). This measures what it costs next to the UNet:

    OMP_NUM_THREADS=1 python bench/scheduler_overhead.py --steps 10 25 50 --repeats 3

Prints wall seconds per image batch for: `sample` with the UNet as denoiser, the pipeline with S3Scheduler, the
pipeline with diffusers' DPMSolverMultistepScheduler (2M) on the same number of steps, and the scheduler alone
(a zero-cost model), with the UNet size it used. bench/scheduler_steps.py measures the per-step cost against N.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

from s3search import baselines
from s3search.denoisers import from_eps
from s3search.integrations.diffusers_scheduler import S3Scheduler
from s3search.integrator import sample


def _unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def _grid(n: int) -> tuple[float, ...]:
    idx = np.unique(np.round(np.linspace(999, 10, n + 1)).astype(int))[::-1]
    return tuple((int(i) + 1) / 1000 for i in idx)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    unet = _unet(args.size)
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel {params / 1e6:.2f} M parameters, batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print("| steps (UNet calls) | sample | S3Scheduler pipeline | overhead | stock DPMSolver++ 2M pipeline | "
          "replay alone |")
    print("|---|---|---|---|---|---|")
    for n in args.steps:
        sched = baselines.get("dpmpp_2m", timesteps=_grid(n), process="vp-discrete")
        calls = sched.nfe
        D = from_eps(lambda x, t: unet(x, t).sample, "vp-discrete")
        x_T = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

        def run_sample():
            with torch.no_grad():
                sample(D, x_T, sched)

        pipe = DDPMPipeline(unet=unet, scheduler=S3Scheduler(schedule=sched))
        pipe.set_progress_bar_config(disable=True)

        def run_pipe():
            pipe(batch_size=args.batch, generator=torch.Generator().manual_seed(0), output_type="pt",
                 num_inference_steps=calls)

        stock = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler(solver_order=2))
        stock.set_progress_bar_config(disable=True)

        def run_stock():
            stock(batch_size=args.batch, generator=torch.Generator().manual_seed(0), output_type="pt",
                  num_inference_steps=calls)

        s3 = S3Scheduler(schedule=sched)

        def run_replay():
            s3.set_timesteps()
            x = x_T.clone()
            for t in s3.timesteps:
                x = s3.step(torch.zeros_like(x), t, x).prev_sample

        t_sample, t_pipe = _best(run_sample, args.repeats), _best(run_pipe, args.repeats)
        t_stock, t_replay = _best(run_stock, args.repeats), _best(run_replay, args.repeats)
        print(f"| {n} ({calls}) | {t_sample:.3f} s | {t_pipe:.3f} s | {100 * (t_pipe / t_sample - 1):+.1f}% | "
              f"{t_stock:.3f} s | {t_replay:.3f} s |")


if __name__ == "__main__":
    main()
