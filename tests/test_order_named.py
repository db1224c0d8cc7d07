"""Measured convergence orders of every deterministic named sampler and baseline on a single Gaussian, whose
probability-flow ODE has a closed-form solution (docs/math.md §8); and distribution convergence of the stochastic
ones, from their exact output moments (D is affine, so every sampler is affine in x_T and its noise draws)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3search import baselines, processes, sample
from s3search.named import NamedSchedule

from gaussian_bed import MU, S2, denoiser, exact_ode, graded_lambda_grid

RANGES = {"edm": (10.0, 0.1), "vp-linear": (0.75, 0.08)}
NS = (96, 128, 192, 256)


def named(sampler: str, **params):
    return lambda ts, process: NamedSchedule(sampler=sampler, process=process, timesteps=ts, params=params)


def baseline(name: str, **params):
    return lambda ts, process: baselines.get(name, ts, process, **params)


def measured_order(make, process: str, grade: int) -> float:
    # Warm-up steps are shrunk (graded grid) so a lower-order start does not cap the order; errors are taken
    # after the final denoise, an affine map of x_N, against D of the exact ODE solution.
    t0, t1 = RANGES[process]
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0
    D = denoiser(process)
    ref = D(exact_ode(x_T, process, t0, t1), t1)
    errors = []
    for n in NS:
        ts = tuple(graded_lambda_grid(process, t0, t1, n, grade))
        errors.append((sample(D, x_T, make(ts, process)) - ref).norm().item())
    return float(-np.polyfit(np.log(NS), np.log(errors), 1)[0])


ORDERS = [
    # (id, schedule maker, expected order, grid grading order)
    ("deis-1", named("deis", order=1), 1, 1),
    ("deis-2", named("deis", order=2), 2, 2),
    ("deis-3", named("deis", order=3), 3, 3),
    ("deis-4", named("deis", order=4), 4, 4),
    ("ipndm-1", named("ipndm", max_order=1), 1, 1),
    ("ipndm-2", named("ipndm", max_order=2), 2, 2),
    # iPNDM keeps the uniform-step Adams-Bashforth weights on non-uniform grids: their error there is
    # h (h_i - h_{i-1}) f' = O(h^3) per step, so orders 3 and 4 are second order on any graded grid.
    ("ipndm-4", named("ipndm", max_order=4), 2, 4),
    ("edm_heun", named("edm_heun"), 2, 2),
    ("er_sde_1-ode", named("er_sde_1", phi=1), 1, 1),
    ("er_sde_2-ode", named("er_sde_2", phi=1), 2, 2),
    # ER-SDE-3 as published takes D' as the first backward difference (the slope at the midpoint, error O(h)),
    # weighted by an O(h^2) coefficient: an O(h^3) local error, so the third stage does not lift it past 2.
    ("er_sde_3-ode", named("er_sde_3", phi=1), 2, 3),
    ("li_accelerated_ode", named("li_accelerated_ode"), 2, 2),
    ("seeds_2-eta0", named("seeds_2", eta=0.0), 2, 2),
    ("seeds_3-eta0", named("seeds_3", eta=0.0), 3, 3),
    ("ddim", baseline("ddim"), 1, 1),
    ("dpmpp_2m", baseline("dpmpp_2m"), 2, 2),
    # The reference 3M halves the exact weight of the second difference (see coefficients.dpmpp_weights).
    ("dpmpp_3m", baseline("dpmpp_3m"), 2, 3),
    ("unipc_bh1_2", baseline("unipc_bh1_2"), 3, 3),
    ("unipc_bh2_3-full", baseline("unipc_bh2_3", lower_order_final=False), 4, 4),
    # lower_order_final makes the last step UniP-2 without corrector: one O(h^3) local error, order 3.
    ("unipc_bh2_3-lof", baseline("unipc_bh2_3"), 3, 4),
    ("sa_solver-tau0", baseline("sa_solver", tau=0.0), 4, 4),
]


@pytest.mark.parametrize("case", ORDERS, ids=[c[0] for c in ORDERS])
def test_order_edm(case):
    _, make, expected, grade = case
    slope = measured_order(make, "edm", grade)
    assert abs(slope - expected) < 0.3, f"measured order {slope:.2f}, expected {expected}"


@pytest.mark.parametrize("case", [c for c in ORDERS if c[0] in ("deis-3", "edm_heun", "er_sde_2-ode",
                                                                   "li_accelerated_ode", "seeds_3-eta0")],
                         ids=lambda c: c[0])
def test_order_vp(case):
    _, make, expected, grade = case
    slope = measured_order(make, "vp-linear", grade)
    assert abs(slope - expected) < 0.3, f"measured order {slope:.2f}, expected {expected}"


# ----- stochastic samplers: exact output moments ----------------------------------------------------------
class _UnitNoise:
    """Stands in for randn_rows: draw k is 1 in row k + 2 and 0 elsewhere. Rows 0 and 1 start at x_T = 0 and
    x_T = 1, so row 0 is the offset, row 1 minus row 0 the gain on x_T, row k + 2 minus row 0 the gain on draw k;
    all per coordinate, since the Gaussian factorises over coordinates."""

    def __init__(self, rows: int):
        self.rows, self.count = rows, 0

    def __call__(self, like: torch.Tensor, generator) -> torch.Tensor:
        z = torch.zeros_like(like)
        assert self.count + 2 < self.rows, "more noise draws than rows"
        z[self.count + 2] = 1.0
        self.count += 1
        return z


def affine_parts(monkeypatch, make, process: str, ts: tuple[float, ...]):
    """(offset, gain on x_T, summed squared gains on the noise draws), per coordinate."""
    import s3search.named.edm as m_edm
    import s3search.noise as m_noise
    import s3search.named.er_sde as m_er
    import s3search.named.li_accelerated as m_li
    import s3search.named.seeds as m_seeds

    rows = 2 + 4 * len(ts)
    fake = _UnitNoise(rows)
    for module in (m_noise, m_edm, m_er, m_li, m_seeds):   # m_noise: the integrator's NoiseStream
        monkeypatch.setattr(module, "randn_rows", fake)
    x = torch.zeros(rows, 4, dtype=torch.float64)
    x[1] = 1.0
    out = sample(denoiser(process), x, make(ts, process))
    offset = out[0]
    return offset, out[1] - offset, ((out[2:2 + fake.count] - offset) ** 2).sum(0)


STOCHASTIC = [
    ("seeds_2", named("seeds_2")), ("seeds_3", named("seeds_3")), ("seeds_2-noise", named("seeds_2", form="noise")),
    ("seeds_3-noise", named("seeds_3", form="noise")), ("seeds_2-eta0.5", named("seeds_2", eta=0.5)),
    ("er_sde_1", named("er_sde_1")), ("er_sde_2", named("er_sde_2")), ("er_sde_3", named("er_sde_3")),
    ("er_sde_3-phi2", named("er_sde_3", phi=2)), ("er_sde_3-phi4", named("er_sde_3", phi=4)),
    ("er_sde_2-phi6", named("er_sde_2", phi=6)), ("er_sde_2-phi3", named("er_sde_2", phi=3)),
    ("li_accelerated_ddpm", named("li_accelerated_ddpm")),
    ("edm_heun-churn", named("edm_heun", s_churn=40.0, s_tmax=5.0)),
    ("ddim_eta1", baseline("ddim_eta1")), ("dpmpp_2m_sde", baseline("dpmpp_2m_sde")),
    ("dpmpp_2m_sde_heun", baseline("dpmpp_2m_sde_heun")), ("dpmpp_3m_sde", baseline("dpmpp_3m_sde")),
    ("sa_solver", baseline("sa_solver")), ("seeds_1-noise", baseline("seeds_1", form="noise")),
]


@pytest.mark.parametrize("case", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_distribution_converges(monkeypatch, case):
    # Start from the exact marginal at sigma = 10 (EDM); the output D(x_N, t_N) should be distributed as
    # D(x, 0.1) for x ~ N(MU, S2 + 0.1^2): mean MU, variance S2^2 / (S2 + 0.1^2). Errors must shrink with the
    # number of steps, at least like steps^-0.7 (weak first order, with slack for the pre-asymptotic range).
    _, make = case
    process, (t0, t1) = "edm", RANGES["edm"]
    proc = processes.get(process)
    target_mean, target_var = MU, S2**2 / (S2 + t1**2)
    var_T = S2 + t0**2
    ns, errors = (8, 16, 32, 64), []
    for n in ns:
        ts = tuple(proc.t_of_lambda(float(l)) for l in np.linspace(proc.lambda_(t0), proc.lambda_(t1), n + 1))
        offset, gain, noise_var = affine_parts(monkeypatch, make, process, ts)
        mean, var = offset + gain * MU, gain**2 * var_T + noise_var
        errors.append(((mean - target_mean).norm() + (var - target_var).norm()).item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert slope > 0.7, (slope, errors)
