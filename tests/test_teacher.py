"""Trajectory teachers (evaluation/teacher.py): one recorded fine run per start serves every end time, as
accurately as a fine run to that end, at a fraction of its model calls."""

from __future__ import annotations

import pytest
import torch

from s3search import processes
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator, teacher_checkpoints
from s3search.evaluation.seeds import sample_seeds
from s3search.evaluation.teacher import fine_schedule, record_path, teacher_at
from s3search.integrator import sample
from s3search.models import registry
from s3search.models.base import single_threaded
from s3search.noise import generators_for
from s3search.schedule import SolverSchedule, StepSpec


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def digits():
    with single_threaded():
        yield registry.get("digits")


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@pytest.mark.parametrize("gap", [0.0, 0.37, 1.0, 2.9])
@pytest.mark.parametrize("final", ["none", "denoise"])
def test_teacher_at_an_end_is_as_accurate_as_a_fine_run_to_it(digits, gap, final):
    proc = digits.process
    x_T = proc.sigma(proc.t_max) * torch.randn((16, *digits.shape), generator=torch.Generator().manual_seed(1))
    model = Counting(digits.denoiser)
    path = record_path(model, x_T, proc.name, proc.t_max, proc.t_min, 100, 10)
    assert model.calls == 100 and len(path.times) == 11
    t_end = proc.t_of_lambda(proc.lambda_(proc.t_min) - gap)
    model.calls = 0
    got = teacher_at(model, path, t_end, final)
    assert model.calls <= 2 * 10 + 1 + (final == "denoise")
    direct = sample(digits.denoiser, x_T, fine_schedule(proc.name, proc.t_max, t_end, final, 100))
    exact = sample(digits.denoiser, x_T, fine_schedule(proc.name, proc.t_max, t_end, final, 400))
    # Against a run four times finer, the recorded path is off by the order of its own step's error (a direct
    # run to a nearer end takes shorter steps): far below what any schedule of 3-10 NFE is off by.
    assert _rms(got - exact) <= 5.0 * _rms(direct - exact) + 1e-6 * _rms(exact)
    assert _rms(got - exact) < 2e-4 * _rms(exact)


def test_an_end_at_a_checkpoint_costs_no_model_call(digits):
    proc = digits.process
    x_T = proc.sigma(proc.t_max) * torch.randn((4, *digits.shape), generator=torch.Generator().manual_seed(2))
    model = Counting(digits.denoiser)
    path = record_path(model, x_T, proc.name, proc.t_max, proc.t_min, 40, 4)
    model.calls = 0
    assert torch.equal(teacher_at(model, path, path.times[2], "none"), path.states[2])
    assert model.calls == 0
    with pytest.raises(ValueError, match="outside the recorded path"):
        teacher_at(model, path, proc.t_min / 2, "none")


def test_checkpoints_shrink_for_large_states_but_never_below_two():
    assert teacher_checkpoints(256, 1000, 20) == 20
    assert teacher_checkpoints(4 * 4 * 128 * 128, 1000, 20) == 4
    assert teacher_checkpoints(1 << 30, 1000, 20) == 2


def _schedule(process: processes.NoiseProcess, t_end: float) -> SolverSchedule:
    lam0, lam1 = process.lambda_(process.t_max), process.lambda_(t_end)
    ts = [process.t_of_lambda(lam0 + (lam1 - lam0) * i / 5) for i in range(6)]
    ts[0], ts[-1] = process.t_max, t_end
    return SolverSchedule(process=process.name, timesteps=tuple(ts), steps=tuple(StepSpec(order=min(2, i + 1)) for i in range(5)))


def test_the_evaluator_records_one_fine_run_for_several_ends(digits):
    proc = digits.process
    ends = [proc.t_min, proc.t_of_lambda(proc.lambda_(proc.t_min) - 1.3), proc.t_of_lambda(proc.lambda_(proc.t_min) - 2.2)]
    request = EvalRequest(model="digits", metric="trajectory", n_samples=24)
    ev = LocalEvaluator(batch_size=10, trajectory_steps=60, trajectory_checkpoints=6)
    with single_threaded():
        results = ev.evaluate([_schedule(proc, t) for t in ends], request)
    assert all(r.ok for r in results), [r.error for r in results]
    assert len(ev._paths) == 1 and len(next(iter(ev._paths.values()))) == 3   # one path, one per batch
    # The same figures as the schedule's own samples against a teacher run directly to each end.
    gens = generators_for(sample_seeds(0, "search", 24))
    x_T = ev._x_T(digits, proc, proc.t_max, gens)
    for t_end, result in zip(ends, results):
        sched = _schedule(proc, t_end)
        with single_threaded():
            out = sample(digits.denoiser, x_T, sched)
            ref = sample(digits.denoiser, x_T, fine_schedule(proc.name, proc.t_max, t_end, sched.final, 60))
        mean_rms = float((out - ref).reshape(24, -1).pow(2).mean(1).sqrt().mean())
        assert result.value == pytest.approx(mean_rms, rel=1e-3)
