"""Align Your Steps optimiser: the estimator against closed forms, the search against known optima.

Why the Gaussian theorem is tested the way it is: for data N(0, c^2 I) the KL-optimal *DDIM* grid is
c tan(...) (uniform in arctan(sigma/c)), but the *KLUB* minimiser is a different grid (asymptotically uniform in
log(sigma / sqrt(sigma^2 + c^2)), crowded at low noise). So the theorem is checked through the separable DDIM cost
it comes from (one Euler step scales the exact flow by cos of the angle step, verified below on a real Euler
loop), and the Monte Carlo KLUB search is checked against the closed-form KLUB minimiser found by scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from s3search import ays, grids, processes

EDM = processes.get("edm")
VP = processes.get("vp-linear")


# ----- Gaussian data ---------------------------------------------------------------------------------------
def gaussian(c: float, dim: int):
    def sampler(n: int, g: torch.Generator) -> torch.Tensor:
        return c * torch.randn(n, dim, generator=g, dtype=torch.float64)

    def d_edm(x: torch.Tensor, t: float) -> torch.Tensor:
        return c * c / (c * c + t * t) * x

    def d_vp(x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = VP.alpha(t), VP.sigma(t)
        return a * c * c / (a * a * c * c + s * s) * x

    return sampler, d_edm, d_vp


def exact_klub_cost(c: float, dim: int):
    def cost(intervals, seed):
        return np.array([ays.gaussian_klub(lo, up, c, dim) for lo, up in intervals])

    return cost


def ddim_kl_cost(c: float):
    # -log of the factor by which one Euler step shrinks the exact flow's scale (see test_euler_shrink_factor).
    def cost(intervals, seed):
        return np.array([-math.log(math.cos(math.atan(up / c) - math.atan(lo / c))) for lo, up in intervals])

    return cost


def scipy_minimiser(cost, n: int, s_min: float, s_max: float) -> np.ndarray:
    """An independent optimiser: BFGS over softmax log-gaps, from a uniform start."""
    lo, hi = math.log(s_min), math.log(s_max)

    def grid(z):
        w = np.exp(z - z.max())
        return np.exp(hi - np.concatenate([[0.0], np.cumsum(w / w.sum())]) * (hi - lo))

    res = minimize(lambda z: ays.estimate_klub(cost, grid(z)), np.zeros(n), method="BFGS", options=dict(gtol=1e-10))
    return grid(res.x)


def sig(proc, ts):
    return np.array([proc.sigma_ve(t) for t in ts])


# ----- the estimator ------------------------------------------------------------------------------------------
def test_importance_sampler_inverts_its_cdf():
    lo, up, c = 0.01, 3.0, 0.5
    u = np.linspace(0.01, 0.99, 25)
    s = ays.sample_importance(lo, up, c, u)
    f = ays.importance_antiderivative
    np.testing.assert_allclose((f(s, up, c) - f(lo, up, c)) / (f(up, up, c) - f(lo, up, c)), u, atol=1e-12)
    # The closed form's derivative is the density: compare with a central difference.
    h = 1e-6
    dens = (f(s + h, up, c) - f(s - h, up, c)) / (2 * h)
    np.testing.assert_allclose(dens, s**-3 * (1 / (s * s + c * c) - 1 / (up * up + c * c)), rtol=1e-5)


@pytest.mark.parametrize("c_data", [0.5, 1.0])
def test_klub_estimate_matches_closed_form(c_data):
    """Unbiasedness of the stratified importance-sampled estimator (importance c=0.5 fixed, data c varies)."""
    sampler, d_edm, _ = gaussian(c_data, 4)
    obj = ays.KLUBObjective(d_edm, EDM, sampler, n_samples=4096, n_times=32)
    intervals = [(0.002, 0.01), (0.02, 0.3), (0.3, 1.0), (1.0, 5.0), (5.0, 80.0), (0.002, 80.0)]
    est = obj(intervals, seed=7)
    exact = [ays.gaussian_klub(lo, up, c_data, 4) for lo, up in intervals]
    # Measured relative errors are below 1e-2 at this sample size; 3e-2 leaves room for other seeds.
    np.testing.assert_allclose(est, exact, rtol=3e-2)
    assert obj.calls == len(intervals) * 33


def test_vp_and_edm_give_the_same_klub():
    """The KLUB is invariant under x -> x / alpha and the change of time: a VP denoiser gives the EDM figure."""
    sampler, d_edm, d_vp = gaussian(1.0, 3)
    intervals = [(0.02, 0.1), (0.1, 2.0), (2.0, 150.0)]
    a = ays.KLUBObjective(d_edm, processes.EDM(t_max=160.0), sampler, 512, 8)(intervals, seed=3)
    b = ays.KLUBObjective(d_vp, VP, sampler, 512, 8)(intervals, seed=3)
    np.testing.assert_allclose(b, a, rtol=1e-9)


def test_euler_shrink_factor():
    """One DDIM/Euler step on N(0, c^2) data scales the exact flow by cos(delta theta), theta = arctan(sigma/c)."""
    c, sigmas = 0.7, [40.0, 3.0, 0.9, 0.2, 0.01]
    x = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x * math.sqrt(c * c + sigmas[0] ** 2)
    for s, t in zip(sigmas, sigmas[1:]):
        x = x + (t - s) * (x - c * c / (c * c + s * s) * x) / s
    theta = np.arctan(np.array(sigmas) / c)
    predicted = math.sqrt(c * c + sigmas[-1] ** 2) * np.prod(np.cos(np.diff(theta)))
    assert x.std().item() == pytest.approx(predicted, rel=1e-2)


# ----- the search ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 10])
@pytest.mark.parametrize("c", [0.5, 2.0])
def test_search_recovers_the_gaussian_theorem(n, c):
    """Coordinate search on the DDIM KL cost lands on c tan(...) (docs/math.md §7) from the EDM initialisation."""
    res = ays.optimise(None, None, n, process=EDM, cost=ddim_kl_cost(c), max_iterations=3000, min_window=0.005)
    target = sig(EDM, grids.kl_optimal(EDM, n, c=c))
    # Measured: <= 4e-3 in log sigma (the resolution of the final candidate window); 1e-2 = 1 % in sigma.
    np.testing.assert_allclose(np.log(res.sigmas), np.log(target), atol=1e-2)
    assert not res.stopped_early and res.iterations < 3000


def test_search_finds_the_exact_klub_minimiser():
    cost = exact_klub_cost(0.5, 1)
    res = ays.optimise(None, None, 6, process=EDM, cost=cost, max_iterations=3000, min_window=0.005)
    ref = scipy_minimiser(cost, 6, EDM.t_min, EDM.t_max)
    np.testing.assert_allclose(np.log(res.sigmas), np.log(ref), atol=1e-2)
    assert ays.estimate_klub(cost, res.sigmas) <= ays.estimate_klub(cost, ref) * (1 + 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_monte_carlo_search_lands_on_the_klub_minimiser(seed):
    """The full Monte Carlo optimiser (exact Gaussian denoiser, data c=1, importance c=0.5)."""
    c, dim, n = 1.0, 8, 4
    sampler, d_edm, _ = gaussian(c, dim)
    cost = exact_klub_cost(c, dim)
    ref = scipy_minimiser(cost, n, EDM.t_min, EDM.t_max)
    res = ays.optimise(d_edm, sampler, n, process=EDM, n_samples=1024, n_times=16, seed=seed, max_iterations=120)
    # Measured over seeds 0-5: at most 1.5e-2 in log sigma (Monte Carlo noise at 1024 samples); 4e-2 allowed.
    np.testing.assert_allclose(np.log(res.sigmas), np.log(ref), atol=4e-2)
    assert ays.estimate_klub(cost, res.sigmas) <= ays.estimate_klub(cost, ref) * 1.002


def test_vp_process_gives_the_same_noise_levels_as_edm():
    c, dim, n = 1.0, 4, 3
    sampler, d_edm, d_vp = gaussian(c, dim)
    kw = dict(n_samples=256, n_times=8, seed=5, max_iterations=24)
    # The same sigma range on both: vp-linear's own range, given to EDM as explicit times.
    lo, hi = VP.sigma_ve(VP.t_min), VP.sigma_ve(VP.t_max)
    edm_wide = processes.EDM(t_min=lo, t_max=hi)
    a = ays.optimise(d_edm, sampler, n, process=edm_wide, **kw)
    b = ays.optimise(d_vp, sampler, n, process=VP, **kw)
    np.testing.assert_allclose(a.sigmas, sig(VP, b.timesteps), rtol=1e-8)
    assert b.timesteps[0] == VP.t_max and b.timesteps[-1] == VP.t_min


# ----- a 2-D mixture ------------------------------------------------------------------------------------------
def ring_mixture(k: int = 8, std: float = 0.1):
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    mu = torch.stack([ang.cos(), ang.sin()], 1)

    def sampler(n: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, k, (n,), generator=g)
        return mu[idx] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)

    def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
        # docs/math.md §8 with isotropic components: responsibilities times each component's posterior mean.
        v = std * std + t * t
        diff = x[:, None, :] - mu[None]
        r = torch.softmax(-(diff**2).sum(-1) / (2 * v), dim=1)
        return (r[..., None] * (mu[None] + std * std / v * diff)).sum(1)

    return sampler, denoiser


def test_optimiser_reduces_klub_on_a_2d_mixture():
    sampler, denoiser = ring_mixture()
    n = 4
    events = []
    res = ays.optimise(denoiser, sampler, n, process=EDM, n_samples=512, n_times=8, seed=0, max_iterations=30,
                       callback=events.append)
    judge = ays.KLUBObjective(denoiser, EDM, sampler, n_samples=4096, n_times=32)
    init = sig(EDM, grids.edm(EDM, n))
    before = ays.estimate_klub(judge, init, seed=999)
    after = ays.estimate_klub(judge, res.sigmas, seed=999)
    # Measured: after / before ~ 0.04 at 6 steps and 100 updates; at 4 steps and 30 updates well below 0.5.
    assert after < 0.5 * before
    assert len(events) == res.iterations and events[-1].iteration == res.iterations
    assert all(1 <= e.index <= n - 1 for e in events)


def test_subdivision_keeps_points_and_optimises_only_new_ones():
    cost = ddim_kl_cost(0.5)
    res = ays.optimise(None, None, 3, process=EDM, cost=cost, subdivisions=2, max_iterations=3000,
                       min_window=0.005)
    assert [st.steps for st in res.stages] == [3, 6, 12]
    for coarse, fine in zip(res.stages, res.stages[1:]):
        assert fine.sigmas[::2] == coarse.sigmas
        mids = np.array(fine.sigmas[1::2])
        assert np.all((mids < np.array(coarse.sigmas[:-1])) & (mids > np.array(coarse.sigmas[1:])))
    # For this separable cost the refined points are optimal given their neighbours: equal angle halves.
    theta = np.arctan(np.array(res.sigmas) / 0.5)
    np.testing.assert_allclose(theta[1::2], (theta[:-1:2] + theta[2::2]) / 2, atol=3e-3)
    assert res.grid(12) == res.timesteps
    assert res.grid(6) == pytest.approx(grids.from_sigmas(EDM, res.stages[1].sigmas), rel=1e-12)
    assert len(res.grid(7)) == 8


def test_seeded_and_stoppable():
    sampler, denoiser = ring_mixture()
    kw = dict(process=EDM, n_samples=128, n_times=4, max_iterations=6)
    a = ays.optimise(denoiser, sampler, 3, seed=1, **kw)
    b = ays.optimise(denoiser, sampler, 3, seed=1, **kw)
    assert a.sigmas == b.sigmas
    stop = ays.optimise(denoiser, sampler, 3, seed=1, callback=lambda e: e.iteration >= 2, **kw)
    assert stop.stopped_early and stop.iterations == 2


def test_progress_printer_writes_every_nth_update():
    import io

    out = io.StringIO()
    res = ays.optimise(None, None, 4, process=EDM, cost=ddim_kl_cost(1.0), max_iterations=9,
                       callback=ays.progress_printer(out, every=3))
    lines = out.getvalue().splitlines()
    assert res.iterations == 9 and len(lines) == 3
    assert lines[0].startswith("ays stage 0 sweep 0 update 3: sigma[")
    with pytest.raises(ValueError, match="every="):
        ays.progress_printer(every=0)


def test_discrete_process_starts_time_uniform():
    proc = processes.get("vp-discrete")
    res = ays.optimise(None, None, 4, process=proc, cost=ddim_kl_cost(1.0), max_iterations=0)
    assert res.timesteps == pytest.approx(grids.time_uniform(proc, 4), rel=1e-9)


@pytest.mark.parametrize("kwargs,field", [
    (dict(n=1), "n="),
    (dict(subdivisions=-1), "subdivisions="),
    (dict(init="nope"), "init="),
    (dict(init=[80.0, 1.0]), "init has"),
    (dict(process=None), "process is required"),
    (dict(n_samples=4, n_times=8), "n_samples="),
    (dict(c=-1.0), "c="),
    (dict(candidates=4), "candidates="),
    (dict(window=1.5), "window="),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    sampler, d_edm, _ = gaussian(1.0, 2)
    args = dict(n=3, process=EDM, max_iterations=1, n_samples=64, n_times=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        ays.optimise(d_edm, sampler, **args)


@pytest.mark.slow
def test_ays_grid_lowers_sampling_nll_on_a_2d_mixture():
    """End to end (paper Table 4 in miniature): 6-step DDIM / stochastic DDIM on the ring mixture, mean NLL under
    the exact noised density, EDM grid against AYS grids (converged, and stopped early after 25 updates)."""
    from s3search.integrator import sample
    from s3search.schedule import SolverSchedule, StepSpec

    k, std, n = 8, 0.1, 6
    sampler, denoiser = ring_mixture(k, std)
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    mu = torch.stack([ang.cos(), ang.sin()], 1)

    def nll(x: torch.Tensor, s_end: float) -> float:
        v = std * std + s_end * s_end
        d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
        return -(torch.logsumexp(-d2 / (2 * v), 1) - math.log(k) - math.log(2 * math.pi * v)).mean().item()

    grids_ = {"edm": grids.edm(EDM, n)}
    for its in (25, 200):
        grids_[f"ays-{its}"] = ays.optimise(denoiser, sampler, n, process=EDM, n_samples=2048, n_times=16,
                                            seed=0, max_iterations=its).timesteps
    g = torch.Generator().manual_seed(0)
    x_T = sampler(20_000, g) + EDM.t_max * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    scores = {}
    for name, ts in grids_.items():
        for eta in (0.0, 1.0):
            sched = SolverSchedule(process="edm", timesteps=ts, steps=tuple(StepSpec(eta=eta) for _ in range(n)))
            scores[name, eta] = nll(sample(denoiser, x_T, sched, torch.Generator().manual_seed(1)), ts[-1])
    print(scores)
    # Measured: EDM 3.53 / 4.07 (DDIM / stochastic), AYS-25 1.24 / 0.79, AYS-200 2.99 / 1.45.
    assert scores["ays-25", 0.0] < scores["edm", 0.0] - 1.0
    assert scores["ays-25", 1.0] < scores["edm", 1.0] - 1.0 and scores["ays-200", 1.0] < scores["edm", 1.0] - 1.0
