"""The integrator against exact answers: convergence orders on a Gaussian, exact stochastic moments,
evaluation counts, batch invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3search import SolverSchedule, StepSpec, processes, sample
from s3search.noise import generators_for

from gaussian_bed import MU, S2, denoiser, exact_ode, graded_lambda_grid

RANGES = {"edm": (10.0, 0.1), "vp-linear": (0.75, 0.08)}


def ramp_schedule(process: str, ts: list[float], order: int, **step_kw) -> SolverSchedule:
    steps = tuple(StepSpec(order=min(order, i + 1), **step_kw) for i in range(len(ts) - 1))
    return SolverSchedule(process=process, timesteps=tuple(ts), steps=steps, final="none")


def measured_order(process: str, order: int, ns=(96, 128, 192, 256), **step_kw) -> float:
    # Asymptotic regime: at N < 64 order-3 rules still show pre-asymptotic slopes of 2.1 to 4.6 on this bed.
    t0, t1 = RANGES[process]
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0
    errors = []
    for n in ns:
        ts = graded_lambda_grid(process, t0, t1, n, order + (1 if step_kw.get("corrector", "none") != "none" else 0))
        sched = ramp_schedule(process, ts, order, **step_kw)
        x = sample(denoiser(process), x_T, sched)
        errors.append((x - exact_ode(x_T, process, t0, t1)).norm().item())
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    return float(slope)


@pytest.mark.parametrize("process", ["edm", "vp-linear"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_taylor_order(process, prediction, order):
    slope = measured_order(process, order, prediction=prediction, derivative="taylor")
    assert abs(slope - order) < 0.3, f"measured order {slope:.2f}, expected {order}"


@pytest.mark.parametrize("derivative, order, expected", [
    ("dpmpp", 2, 2), ("bh1", 2, 2), ("bh2", 2, 2), ("bh1", 3, 3), ("bh2", 3, 3),
])
def test_multistep_variants_order(derivative, order, expected):
    slope = measured_order("edm", order, derivative=derivative)
    assert abs(slope - expected) < 0.3, f"measured order {slope:.2f}, expected {expected}"


def test_dpmpp_3m_is_second_order():
    # DPM-Solver++(3M) as coded in dpm-solver and k-diffusion weights the second difference by K_2 / 2 instead of
    # K_2 (see coefficients.dpmpp_weights), which leaves an O(h^3) local error: globally second order.
    # The exact third-order rule is derivative="taylor".
    slope = measured_order("edm", 3, derivative="dpmpp")
    assert abs(slope - 2) < 0.3, f"measured order {slope:.2f}"


@pytest.mark.parametrize("derivative, order", [("bh2", 1), ("bh2", 2), ("bh1", 2), ("taylor", 2), ("taylor", 3)])
@pytest.mark.parametrize("corrector", ["unic", "implicit"])
def test_corrector_raises_order(derivative, order, corrector):
    slope = measured_order("edm", order, derivative=derivative, corrector=corrector)
    assert abs(slope - (order + 1)) < 0.3, f"measured order {slope:.2f}, expected {order + 1}"


def linear_step_moments(process: str, ts: list[float], eta: float, prediction: str, mean0, var0):
    """Exact mean and variance after first-order stochastic steps on the Gaussian (D is affine per dimension)."""
    proc = processes.get(process)
    m, v = mean0.clone(), var0.clone()
    for s, t in zip(ts[:-1], ts[1:]):
        a_s, s_s, a_t, s_t = proc.alpha(s), proc.sigma(s), proc.alpha(t), proc.sigma(t)
        h = proc.lambda_(t) - proc.lambda_(s)
        gain = a_s * S2 / (a_s**2 * S2 + s_s**2)     # D = MU + gain (x - a_s MU)
        if prediction == "data":
            decay, coef = s_t / s_s * math.exp(-eta * h), a_t * -math.expm1(-(1 + eta) * h)
            slope, offset = decay + coef * gain, coef * (MU - gain * a_s * MU)
            noise_var = s_t**2 * -math.expm1(-2 * eta * h)
        else:
            # eps = (x - a_s D) / s_s, affine in x as well.
            e_slope, e_off = (1 - a_s * gain) / s_s, -a_s * (MU - gain * a_s * MU) / s_s
            coef = (1 + eta) * s_t * -math.expm1(h)
            slope, offset = a_t / a_s + coef * e_slope, coef * e_off
            noise_var = s_t**2 * eta * math.expm1(2 * h)
        m, v = slope * m + offset, slope**2 * v + noise_var
    return m, v


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_steps_match_exact_moments(prediction, eta):
    process = "edm"
    proc = processes.get(process)
    ts = [proc.t_of_lambda(l) for l in np.linspace(proc.lambda_(10.0), proc.lambda_(0.2), 9)]
    n = 20000
    x_T = MU + math.sqrt(10.0**2) * torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched = SolverSchedule(process=process, timesteps=tuple(ts), final="none",
                           steps=tuple(StepSpec(prediction=prediction, eta=eta) for _ in ts[:-1]))
    x = sample(denoiser(process), x_T, sched, generator=torch.Generator().manual_seed(2))
    m, v = linear_step_moments(process, ts, eta, prediction, MU.clone(), torch.full((4,), 100.0, dtype=torch.float64))
    se_mean = torch.sqrt(v / n)
    assert torch.all((x.mean(0) - m).abs() < 5 * se_mean), (x.mean(0), m)
    assert torch.all((x.var(0) / v - 1).abs() < 5 * math.sqrt(2 / n)), (x.var(0), v)


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_stochastic_distribution_converges_to_target(prediction):
    # Exact moments of the eta = 1 sampler approach the target N(MU, S2 + sigma_end^2) as steps increase.
    process = "edm"
    proc = processes.get(process)
    target_var = S2 + 0.2**2
    errors = []
    for n_steps in (8, 16, 32, 64):
        ts = [proc.t_of_lambda(l) for l in np.linspace(proc.lambda_(80.0), proc.lambda_(0.2), n_steps + 1)]
        m, v = linear_step_moments(process, ts, 1.0, prediction, MU.clone(), S2 + 80.0**2)
        errors.append(((m - MU).norm() + (v - target_var).norm()).item())
    assert all(b < a for a, b in zip(errors, errors[1:]))
    slope = -np.polyfit(np.log([8, 16, 32, 64]), np.log(errors), 1)[0]
    assert slope > 0.7, slope


def test_evaluation_count_matches_nfe():
    ts = (80.0, 20.0, 5.0, 1.0, 0.3, 0.05)
    cases = [
        dict(steps=(StepSpec(),) * 5),
        dict(steps=(StepSpec(corrector="unic"), StepSpec(order=2, corrector="unic", derivative="bh2"),
                    StepSpec(order=3, corrector="implicit"), StepSpec(order=2, derivative="dpmpp"), StepSpec())),
        dict(steps=(StepSpec(),) * 5, first_step="zero-x0", final="none"),
        dict(steps=(StepSpec(),) * 4 + (StepSpec(corrector="implicit"),)),
    ]
    for kw in cases:
        sched = SolverSchedule(process="edm", timesteps=ts, **kw)
        calls: list = []
        sample(denoiser("edm", calls), torch.randn(3, 4, dtype=torch.float64), sched)
        assert len(calls) == sched.nfe, (kw, calls)


def test_same_sample_whatever_its_batch():
    sched = SolverSchedule(process="edm", timesteps=(80.0, 10.0, 2.0, 0.5, 0.05),
                           steps=(StepSpec(eta=1.0), StepSpec(order=2, eta=0.5), StepSpec(order=2, corrector="unic",
                                  eta=0.3), StepSpec(prediction="noise", eta=1.0)))
    seeds = list(range(10))
    x_T = torch.randn(10, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80
    full = sample(denoiser("edm"), x_T, sched, generator=generators_for(seeds))
    part = sample(denoiser("edm"), x_T[3:7], sched, generator=generators_for(seeds[3:7]))
    torch.testing.assert_close(full[3:7], part, rtol=0, atol=0)
    again = sample(denoiser("edm"), x_T, sched, generator=generators_for(seeds))
    torch.testing.assert_close(full, again, rtol=0, atol=0)
    other = sample(denoiser("edm"), x_T, sched, generator=generators_for([s + 100 for s in seeds]))
    assert not torch.allclose(full, other)


def test_analytic_first_step_uses_data_mean():
    ts = (80.0, 5.0, 0.5, 0.05)
    x_T = torch.randn(4, 4, dtype=torch.float64) * 80
    base = SolverSchedule(process="edm", timesteps=ts, steps=(StepSpec(),) * 3)
    analytic = SolverSchedule(process="edm", timesteps=ts, steps=(StepSpec(),) * 3, first_step="mean-x0")
    D = denoiser("edm")
    # At sigma = 80 the exact denoiser is within 1e-3 of the data mean, so both must nearly agree.
    torch.testing.assert_close(sample(D, x_T, base), sample(D, x_T, analytic), rtol=1e-2, atol=5e-2)
    with pytest.raises(ValueError, match="data_mean"):
        sample(lambda x, t: x * 0, x_T, analytic)


def test_rejects_non_schedule():
    with pytest.raises(ValueError, match="SolverSchedule"):
        sample(denoiser("edm"), torch.zeros(1, 4), {"steps": []})


def _unfolded_sample(den, x, schedule: SolverSchedule, gens) -> torch.Tensor:
    """The update rules written out directly, each corrected state formed from x: what the integrator's
    folding of a UniC correction into the next step must reproduce."""
    from s3search.integrator import _analytic_first, _evaluate, _schedule_plan
    from s3search.noise import NoiseStream

    proc, plans, ts = processes.get(schedule.process), _schedule_plan(schedule), schedule.timesteps
    history = []
    current = _analytic_first(schedule, den, x, proc) if schedule.first_step != "model" else None
    with NoiseStream(x, sum(1 for st in schedule.steps if st.eta > 0), gens, ahead=False) as noise:
        for i, step in enumerate(schedule.steps):
            if current is None:
                current = _evaluate(den, x, ts[i], proc)
            history.append(current)
            plan = plans[i]
            points = [history[-1]] + [history[-1 - lag] for lag in plan.lags]
            z = noise.next() if step.eta > 0 else None

            def combine(coeffs, pts):
                out = x * plan.decay + sum(c * p.value(plan.prediction) for c, p in zip(coeffs, pts))
                return out + plan.noise_std * z if z is not None else out

            x_next, current = combine(plan.coeffs, points), None
            if plan.corrected is not None:
                predicted = _evaluate(den, x_next, ts[i + 1], proc)
                x_next = combine(plan.corrected, points + [predicted])
                current = _evaluate(den, x_next, ts[i + 1], proc) if step.corrector == "implicit" else predicted
            x = x_next
    if schedule.final == "none":
        return x
    return (current if current is not None else _evaluate(den, x, ts[-1], proc)).data


@pytest.mark.parametrize("process", ["edm", "vp-linear"])
def test_folded_corrections_give_the_unfolded_update(process):
    # Random schedules of the search space: correctors of both kinds next to plain steps, both prediction
    # types, eta > 0, every final rule; the integrator folds each UniC correction into the next step.
    from s3search.space import SearchSpace

    space, den = SearchSpace(process, [4, 6, 8]), denoiser(process)
    rng = np.random.default_rng(11)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3.0
    folded_somewhere = 0
    for _ in range(40):
        sched = space.random(rng)
        folded_somewhere += any(st.corrector == "unic" for st in sched.steps[:-1])
        got = sample(den, x_T * processes.get(process).sigma(sched.timesteps[0]) / 3.0, sched, generators_for(range(16)))
        want = _unfolded_sample(den, x_T * processes.get(process).sigma(sched.timesteps[0]) / 3.0, sched,
                                generators_for(range(16)))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert folded_somewhere >= 10


@pytest.mark.parametrize("process", ["edm", "vp-linear"])
def test_integration_fed_step_by_step_is_sample(process):
    # The caller-driven form (what S3Scheduler runs) on random schedules of the search space, mean-x0 included,
    # with one generator and with one per row: bitwise what `sample` returns.
    from s3search.integrator import Integration
    from s3search.space import SearchSpace

    space = SearchSpace(process, [3, 5, 8], options={"first_steps": ["model", "zero-x0", "mean-x0"]})
    den = denoiser(process)
    mean = torch.full((4,), 0.25, dtype=torch.float64)
    den_with_mean = lambda x, t: den(x, t)  # noqa: E731
    den_with_mean.data_mean = mean
    rng = np.random.default_rng(4)
    for k in range(30):
        sched = space.random(rng)
        x_T = torch.randn(6, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3.0
        for gens in (lambda: torch.Generator().manual_seed(k), lambda: generators_for(range(6))):
            run = Integration(x_T, sched, gens(), data_mean=mean, draw_ahead=False)
            calls = 0
            while not run.done:
                run.give(den(*run.wanted))
                calls += 1
            assert calls == sched.nfe
            assert torch.equal(run.result, sample(den_with_mean, x_T, sched, gens()))


def test_integration_refuses_outputs_after_the_end_and_can_stop_early():
    from s3search.integrator import Integration

    sched = ramp_schedule("edm", [10.0, 3.0, 1.0, 0.3], 2, eta=0.5)
    x_T = torch.randn(2, 4, dtype=torch.float64) * 10.0
    run = Integration(x_T, sched, torch.Generator().manual_seed(0))
    x, t = run.wanted
    assert t == 10.0 and x is x_T
    run.close()
    assert run.done and run.result is None
    with pytest.raises(RuntimeError, match="finished"):
        run.give(x_T)
    with pytest.raises(ValueError, match="data_mean"):
        Integration(x_T, SolverSchedule("edm", (10.0, 1.0), (StepSpec(),), first_step="mean-x0"))
