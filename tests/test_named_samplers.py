"""Exact checks of the named samplers' pieces: quadratures, coefficients, and single steps against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3search import processes
from s3search.named import NamedSchedule, run_named
from s3search.named.deis import rho_ab_coefficients
from s3search.named.er_sde import phi_function, step_integrals
from s3search.named.ipndm import AB_COEFFICIENTS

from gaussian_bed import denoiser


@pytest.mark.parametrize("nodes", [(2.0,), (2.0, 2.7), (2.0, 2.7, 3.9), (2.0, 2.7, 3.9, 6.0)])
def test_rho_ab_integrates_polynomials_exactly(nodes):
    coeffs = rho_ab_coefficients(nodes, 2.0, 1.3)
    for degree in range(len(nodes)):
        exact = (1.3 ** (degree + 1) - 2.0 ** (degree + 1)) / (degree + 1)
        assert abs(sum(c * u**degree for c, u in zip(coeffs, nodes)) - exact) < 1e-12


def test_ab_coefficients_are_adams_bashforth():
    # Uniform steps: sum c_j f(-j) integrates polynomials of degree < k over [0, 1] exactly.
    for k, coeffs in AB_COEFFICIENTS.items():
        for degree in range(k):
            assert abs(sum(c * (-j) ** degree for j, c in enumerate(coeffs)) - 1.0 / (degree + 1)) < 1e-12


def test_er_sde_integrals_closed_form_and_official_riemann():
    phi = phi_function(1)
    s_from, s_to = 3.0, 1.7
    s0, s1 = step_integrals(phi, s_from, s_to)
    assert abs(s0 - math.log(s_from / s_to)) < 1e-13
    assert abs(s1 - ((s_from - s_to) - s_from * math.log(s_from / s_to))) < 1e-12
    r0, r1 = step_integrals(phi, s_from, s_to, "riemann")
    assert abs(r0 / s0 - 1) < 1e-2 and abs(r0 - s0) > 1e-6   # close, but the 100-point sum is not exact
    with pytest.raises(ValueError, match="params.phi"):
        phi_function(8)
    with pytest.raises(ValueError, match="params.phi_eta"):
        phi_function(3, 1.0)


@pytest.mark.parametrize("kind", range(1, 8))
def test_phi_choices_are_admissible(kind):
    # The family needs sigma phi'/phi >= 1 (phi / sigma non-decreasing), docs/math.md §6.6.
    phi = phi_function(kind)
    s = np.geomspace(0.002, 80.0, 400)
    ratio = phi(s) / s
    assert np.all(np.diff(ratio) >= -1e-12 * ratio[1:])


def test_li_ode_matches_the_written_vp_formula():
    # docs/math.md §6.7 in VP coordinates with abar = alpha^2, u = sqrt((1 - abar)/abar), written independently.
    process = "vp-linear"
    proc = processes.get(process)
    ts = (0.9, 0.6, 0.35, 0.1)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = denoiser(process)
    ab = [proc.alpha(t) ** 2 for t in ts]
    u = [math.sqrt((1 - a) / a) for a in ab]
    eps = lambda y, i: (y - proc.alpha(ts[i]) * D(y, ts[i])) / proc.sigma(ts[i])
    y, e_prev = x.clone(), None
    for i in range(len(ts) - 1):
        e = eps(y, i)
        nxt = (math.sqrt(ab[i + 1] / ab[i]) * y
               + (math.sqrt(1 - ab[i + 1]) - math.sqrt(ab[i + 1] * (1 - ab[i]) / ab[i])) * e)
        if e_prev is not None:
            w = math.sqrt(ab[i + 1]) / (ab[i] - ab[i - 1]) * (
                ab[i] * (u[i + 1] - u[i]) + math.asin(math.sqrt(ab[i + 1])) - math.asin(math.sqrt(ab[i])))
            nxt = nxt + w * (e_prev - e)
        y, e_prev = nxt, e
    ref = D(y, ts[-1])
    ours = run_named(D, x, NamedSchedule(sampler="li_accelerated_ode", process=process, timesteps=ts))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def _constant_D(value: float):
    return lambda x, t: torch.full_like(x, value)


def _constant_eps(value: float, proc):
    # D(x, t) = (x - sigma e) / alpha has noise prediction eps = e everywhere: the noise form's frozen quantity.
    return lambda x, t: (x - proc.sigma(t) * value) / proc.alpha(t)


@pytest.mark.parametrize("sampler, params", [
    ("seeds_2", {}), ("seeds_3", {}), ("seeds_2", {"eta": 0.4}), ("seeds_3", {"eta": 2.0}),
    ("seeds_2", {"form": "noise"}), ("seeds_3", {"form": "noise"}),
])
@pytest.mark.parametrize("process", ["edm", "vp-cosine"])
def test_seeds_step_is_exact_for_a_constant_denoiser(sampler, params, process):
    # With D constant every stage is the exact solution of the linear SDE, so one SEEDS step must reproduce the
    # exact transition: mean and variance of the eta-step (data form) or of the eta = 1 noise-form SDE. The noise
    # is made explicit by a unit-vector stand-in for randn_rows (draw k is 1 in row k + 2).
    import s3search.named.seeds as m

    proc = processes.get(process)
    s, t = (8.0, 0.9) if process == "edm" else (0.8, 0.3)
    c = 0.37
    rows = 8
    draws = []

    def unit(like, generator):
        z = torch.zeros_like(like)
        z[len(draws) + 2] = 1.0
        draws.append(1)
        return z

    x = torch.zeros(rows, 1, dtype=torch.float64)
    x[1] = 1.0
    fn = getattr(m, "_step_data") if params.get("form", "data") == "data" else None
    old = m.randn_rows
    m.randn_rows = unit
    try:
        k = int(sampler[-1])
        eta = params.get("eta", 1.0)
        if params.get("form") == "noise":
            out = m._step_noise(_constant_eps(c, proc), x, s, t, proc, k, None)
        else:
            out = fn(_constant_D(c), x, s, t, proc, k, eta, None)
    finally:
        m.randn_rows = old
    offset, gain = out[0, 0].item(), (out[1, 0] - out[0, 0]).item()
    var = float(((out[2:2 + len(draws), 0] - out[0, 0]) ** 2).sum())
    h = proc.lambda_(t) - proc.lambda_(s)
    a_s, a_t, sg_s, sg_t = proc.alpha(s), proc.alpha(t), proc.sigma(s), proc.sigma(t)
    if params.get("form") == "noise":
        # eps frozen at c: x_t = (a_t/a_s) x - 2 sg_t (e^h - 1) c + sg_t sqrt(e^{2h} - 1) z, exactly.
        assert abs(gain - a_t / a_s) < 1e-12 and abs(offset + 2 * sg_t * math.expm1(h) * c) < 1e-12
        assert abs(var - sg_t**2 * math.expm1(2 * h)) < 1e-12 * max(1.0, var)
        return
    exp_gain = sg_t / sg_s * math.exp(-eta * h)
    exp_off = a_t * -math.expm1(-(1 + eta) * h) * c
    exp_var = sg_t**2 * -math.expm1(-2 * eta * h)
    assert abs(gain - exp_gain) < 1e-12 and abs(offset - exp_off) < 1e-12
    assert abs(var - exp_var) < 1e-12 * max(1.0, exp_var)
