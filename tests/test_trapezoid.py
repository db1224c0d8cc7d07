"""The trapezoidal rule in flow time as a derivative of the schedule space (Heun on the flow ODE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3search import SolverSchedule, StepSpec, baselines, grids, processes, sample
from s3search.coefficients import step_weights, trapezoid_weights
from s3search.named import NamedSchedule
from s3search.space import SearchSpace, SpaceOptions

from gaussian_bed import denoiser


def _nonlinear_denoiser():
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return lambda x, t: torch.tanh(x @ a) * 0.5 + 0.1 * x * math.sin(3.0 * t)


def _flow_heun_by_hand(den, x, ts, proc):
    """Heun in flow coordinates written out: y = x / (alpha + sigma), tau = sigma / (alpha + sigma)."""
    def point(t):
        c = proc.alpha(t) + proc.sigma(t)
        return c, proc.sigma(t) / c

    c, tau = point(ts[0])
    y = x / c
    for t in ts[1:]:
        c_n, tau_n = point(t)
        v = (y - den(y * c, ts[list(ts).index(t) - 1])) / tau
        y_pred = y + (tau_n - tau) * v
        v_n = (y_pred - den(y_pred * c_n, t)) / tau_n
        y = y + (tau_n - tau) * (v + v_n) / 2
        c, tau = c_n, tau_n
    return den(y * c, ts[-1])


@pytest.mark.parametrize("process", ["flow", "edm", "vp-cosine", "vp-linear"])
def test_heun_as_a_schedule_is_heun_in_flow_time(process):
    proc = processes.get(process)
    ts = grids.logsnr(proc, 5)
    den = _nonlinear_denoiser()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * proc.sigma(ts[0])
    sched = baselines.get("flow_heun", ts, process)
    assert isinstance(sched, SolverSchedule)
    assert sched.nfe == 2 * (len(ts) - 1) + 1
    by_hand = _flow_heun_by_hand(den, x, ts, proc)
    torch.testing.assert_close(sample(den, x, sched), by_hand, rtol=1e-12, atol=1e-12)
    # The named sampler, an independent implementation kept for older documents, agrees.
    named = NamedSchedule(sampler="flow_heun", process=process, timesteps=tuple(ts))
    torch.testing.assert_close(sample(den, x, named), by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam_s,h", [(-6.0, 0.5), (-0.3, 1.7), (2.0, 3.0), (8.0, 0.01)])
def test_trapezoid_weights_are_consistent(lam_s, h):
    w = trapezoid_weights(lam_s, h)
    # A constant D is a fixed point of every step: the weights sum to the data form's K_0.
    assert w.sum() == pytest.approx(-math.expm1(-h), rel=1e-12)
    # Without a corrector the rule is Euler in flow time, which is DDIM.
    assert step_weights("trapezoid", h, [0.0], corrector=False).tolist() == \
        pytest.approx([-math.expm1(-h)], rel=1e-14)
    np.testing.assert_allclose(step_weights("trapezoid", h, [0.0, 1.0], corrector=True, lam_s=lam_s), w)
    with pytest.raises(ValueError, match="lam_s"):
        step_weights("trapezoid", h, [0.0, 1.0], corrector=True)


@pytest.mark.parametrize("process,t0,t1", [("flow", 0.98, 0.02), ("vp-cosine", 0.9, 0.05)])
@pytest.mark.parametrize("corrector", ["implicit", "unic"])
def test_trapezoid_corrector_order(process, t0, t1, corrector):
    from gaussian_bed import exact_ode

    den = denoiser(process)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0
    ref = exact_ode(x, process, t0, t1)
    ns = (16, 24, 32, 48)
    errors = []
    for n in ns:
        ts = grids.logsnr(processes.get(process), n, t0, t1)
        sched = SolverSchedule(process=process, timesteps=tuple(ts), final="none",
                               steps=tuple(StepSpec(derivative="trapezoid", corrector=corrector) for _ in range(n)))
        errors.append((sample(den, x, sched) - ref).norm().item())
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.3, (slope, errors)


def test_trapezoid_step_rules_name_the_field():
    with pytest.raises(ValueError, match=r"step\.order=2 must be 1 with derivative=trapezoid"):
        StepSpec(derivative="trapezoid", order=2)
    with pytest.raises(ValueError, match=r"step\.eta=0\.5 must be 0"):
        StepSpec(derivative="trapezoid", corrector="implicit", eta=0.5)
    with pytest.raises(ValueError, match=r"step\.prediction='noise' must be data"):
        StepSpec(derivative="trapezoid", corrector="unic", prediction="noise")
    doc = baselines.get("flow_heun", grids.logsnr(processes.get("flow"), 3), "flow").to_dict()
    doc["steps"][1]["order"] = 2
    with pytest.raises(ValueError, match=r"steps\[1\]\.order=2"):
        SolverSchedule.from_dict(doc)
    # Uncorrected, the rule is DDIM in either prediction and with noise: one hash, one schedule.
    ts = tuple(grids.logsnr(processes.get("edm"), 3))
    euler = SolverSchedule(process="edm", timesteps=ts, steps=(StepSpec(derivative="trapezoid"),) * 3)
    assert euler.canonical_hash() == baselines.get("ddim", ts, "edm").canonical_hash()


def test_the_space_draws_and_keeps_valid_trapezoid_steps():
    space = SearchSpace("flow", [4, 5, 6], options=SpaceOptions(derivatives=("trapezoid", "taylor"),
                                                       predictions=("noise", "data")))
    rng = np.random.default_rng(0)
    seen = set()
    pop = [space.random(rng) for _ in range(60)]
    for _ in range(300):
        a, b = pop[int(rng.integers(len(pop)))], pop[int(rng.integers(len(pop)))]
        child = space.mutate(space.crossover(a, b, rng), rng)
        assert space.contains(child) and child.nfe in (4, 5, 6)
        seen |= {(s.derivative, s.corrector) for s in child.steps}
        pop.append(child)
    for _ in range(50):
        u = rng.random(space.unit_dim(5))
        assert space.from_unit(u, 5).nfe == 5
    assert {("trapezoid", "implicit"), ("trapezoid", "unic")} <= seen
    # Heun itself is a point of the default space: the search can tune its grid.
    default = SearchSpace("flow", [5])
    heun = baselines.for_nfe("flow_heun", 5, "flow", grid="flow-shift", t_start=default.t_max, t_end=default.t_min)
    assert default.contains(heun)


def test_a_space_without_data_prediction_never_corrects_with_the_trapezoid():
    space = SearchSpace("edm", [5], options=SpaceOptions(derivatives=("trapezoid", "bh2"), predictions=("noise",)))
    rng = np.random.default_rng(1)
    for _ in range(100):
        s = space.mutate(space.random(rng, 5), rng)
        assert space.contains(s)
        assert all(st.derivative != "trapezoid" or st.corrector == "none" for st in s.steps)
