"""Trajectory teachers: one fine run per (start, noise) pair, shared by every end time a search tries.

The `trajectory` metric compares a schedule's output with a high-NFE run of the same model from the same x_T to
the same end (docs/math.md, "Trajectory error"). A search moves the end (`t_end_span`), so a teacher computed per
end would cost a whole fine run per new end: far more model calls than the schedules it scores. Instead, one fine
run from the start down to the process's t_min records its state at checkpoints, and the teacher for an end
continues from the last checkpoint at or above it, on logSNR steps half as long as the fine run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import processes
from ..integrator import Integration, sample
from ..schedule import SolverSchedule, StepSpec

__all__ = ["TeacherPath", "fine_schedule", "record_path", "teacher_at"]

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class TeacherPath:
    """The fine run's states at its checkpoint times (noisiest first; times[0] is the start, states[0] x_T)."""

    process: str
    times: tuple[float, ...]
    states: tuple[torch.Tensor, ...]
    lambda_step: float          # the fine run's step in half-logSNR


def fine_schedule(process: str, t_start: float, t_end: float, final: str, steps: int) -> SolverSchedule:
    """A high-NFE run: 3rd-order multistep (warming up from orders 1 and 2) on a logSNR-uniform grid."""
    proc = processes.get(process)
    lam0, lam1 = proc.lambda_(t_start), proc.lambda_(t_end)
    ts = [t_start] + [proc.t_of_lambda(lam0 + (lam1 - lam0) * i / steps) for i in range(1, steps)] + [t_end]
    spec = [StepSpec(order=min(3, i + 1)) for i in range(steps)]
    return SolverSchedule(process=process, timesteps=tuple(ts), steps=tuple(spec), final=final)


def record_path(denoiser: Denoiser, x_T: torch.Tensor, process: str, t_start: float, t_floor: float,
                steps: int, checkpoints: int) -> TeacherPath:
    """Run the fine schedule from x_T at t_start to t_floor, keeping the state at `checkpoints` evenly spaced
    grid points (and at t_floor). States are kept on the CPU: they outlive the run."""
    if checkpoints < 1 or steps < 1:
        raise ValueError(f"steps={steps} and checkpoints={checkpoints} must be >= 1")
    schedule = fine_schedule(process, t_start, t_floor, "none", steps)
    every = max(1, math.ceil(steps / checkpoints))
    times, states = [], []
    run = Integration(x_T, schedule)
    index = 0
    while not run.done:
        x, t = run.wanted
        # Each step of this schedule evaluates the model once, at its own grid point, on the state there.
        if t != schedule.timesteps[index]:
            raise RuntimeError(f"the fine run asked for t={t} at step {index}, not its grid point")
        if index % every == 0:
            times.append(float(t))
            states.append(x.detach().cpu().clone())
        run.give(denoiser(x, t))
        index += 1
    times.append(float(t_floor))
    states.append(run.result.detach().cpu().clone())
    proc = processes.get(process)
    return TeacherPath(process, tuple(times), tuple(states), (proc.lambda_(t_floor) - proc.lambda_(t_start)) / steps)


def teacher_at(denoiser: Denoiser, path: TeacherPath, t_end: float, final: str,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's output at t_end (denoised when final is "denoise"), from the last checkpoint at or above it."""
    if not path.times[-1] <= t_end <= path.times[0]:
        raise ValueError(f"t_end={t_end} is outside the recorded path [{path.times[-1]}, {path.times[0]}]")
    c = max(i for i, t in enumerate(path.times) if t >= t_end)
    x = path.states[c].to(device)
    if path.times[c] == t_end:
        return (denoiser(x, t_end) if final == "denoise" else x).detach().cpu()
    proc = processes.get(path.process)
    gap = proc.lambda_(t_end) - proc.lambda_(path.times[c])
    # Half-length steps keep the restarted multistep's order-1 and order-2 warm-up as accurate as the fine run.
    steps = max(2, math.ceil(gap / (0.5 * path.lambda_step)))
    return sample(denoiser, x, fine_schedule(path.process, path.times[c], t_end, final, steps)).detach().cpu()
