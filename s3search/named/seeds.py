"""SEEDS-1/2/3 (Gonzalez et al., NeurIPS 2023): single-step stochastic exponential Runge-Kutta, docs/math.md §6.5.

Stages sit at lambda_s + c h (SEEDS-2: c = 1/2; SEEDS-3: 1/3, 2/3). The Brownian increment over each step is cut
at the stage nodes, one standard normal per segment, so every stage sees exactly the noise accumulated up to it
("modified Gaussian increments"); the total noise variance at each node is the exact one. The data form takes
any eta (as ComfyUI's generalisation; eta = 1 is the paper's SDE); the noise form is the paper's eta = 1 SDE.
Final-step rule: x = D(x_N, t_N) like every sampler here (the official code returns x_N instead).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..noise import GeneratorArg, randn_rows
from ..processes import NoiseProcess
from ._common import Denoise, check_grid
from .registry import NamedSampler, Param, choice, number, register

__all__ = ["seeds", "NODES"]

NODES = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def _psi(y: float) -> float:
    """1 + (e^{-y} - 1) / y: the weight of a linear-in-lambda correction integrated exactly."""
    return 1.0 + math.expm1(-y) / y


class _Increments:
    """The noise part of the stages: N_u = sigma_u * acc_u, with acc advanced segment by segment."""

    def __init__(self, like: torch.Tensor, generator: GeneratorArg, rate: float, data_form: bool):
        self.like, self.generator, self.rate, self.data_form = like, generator, rate, data_form
        self.acc: torch.Tensor | None = None
        self.c = 0.0

    def at(self, c: float) -> torch.Tensor | None:
        if self.rate == 0.0:
            return None
        d = (c - self.c) * self.rate           # segment length in lambda, times eta
        if self.data_form:
            keep, fresh = math.exp(-d), math.sqrt(-math.expm1(-2.0 * d))
        else:
            keep, fresh = math.exp(d), math.sqrt(math.expm1(2.0 * d))
        z = randn_rows(self.like, self.generator) * fresh
        self.acc = z if self.acc is None else self.acc * keep + z
        self.c = c
        return self.acc


def _step_data(den: Denoise, x: torch.Tensor, s: float, t: float, process: NoiseProcess, k: int, eta: float,
               generator: GeneratorArg) -> torch.Tensor:
    lam_s, lam_t = process.lambda_(s), process.lambda_(t)
    h = lam_t - lam_s
    sig_s = process.sigma(s)
    noise = _Increments(x, generator, eta * h, data_form=True)

    def point(c: float) -> tuple[float, float, float]:
        tc = t if c == 1.0 else process.t_of_lambda(lam_s + c * h)
        return tc, process.alpha(tc), process.sigma(tc)

    def base(c: float) -> tuple[torch.Tensor, float, float]:
        # The eta-family step s -> c with D frozen at D_s, plus the accumulated noise.
        tc, a_c, s_c = point(c)
        xc = (s_c / sig_s * math.exp(-eta * c * h)) * x + (-a_c * math.expm1(-(1.0 + eta) * c * h)) * d_s
        n = noise.at(c)
        return (xc if n is None else xc + s_c * n), tc, a_c

    d_s = den(x, s)
    H = (1.0 + eta) * h
    if k == 1:
        return base(1.0)[0]
    if k == 2:
        (c2,) = NODES[2]
        x2, t2, _ = base(c2)
        d_2 = den(x2, t2)
        # Stage 2 at t: D interpolated at the midpoint rule's weight 1 / (2 c2).
        _, a_t, s_t = point(1.0)
        xt = (s_t / sig_s * math.exp(-eta * h)) * x + (-a_t * math.expm1(-H)) * (d_s + (d_2 - d_s) / (2.0 * c2))
        n = noise.at(1.0)
        return xt if n is None else xt + s_t * n
    c2, c3 = NODES[3]
    x2, t2, _ = base(c2)
    d_2 = den(x2, t2)
    # Stage 3 at c3: exact integral of D linear in lambda through (0, D_s), (c2, D_2).
    t3, a_3, s_3 = point(c3)
    x3 = ((s_3 / sig_s * math.exp(-eta * c3 * h)) * x + (-a_3 * math.expm1(-(1.0 + eta) * c3 * h)) * d_s
          + (c3 / c2 * a_3 * _psi((1.0 + eta) * c3 * h)) * (d_2 - d_s))
    n = noise.at(c3)
    x3 = x3 if n is None else x3 + s_3 * n
    d_3 = den(x3, t3)
    # Final stage: the same integral through (0, D_s), (c3, D_3).
    _, a_t, s_t = point(1.0)
    xt = ((s_t / sig_s * math.exp(-eta * h)) * x + (-a_t * math.expm1(-H)) * d_s
          + (a_t * _psi(H) / c3) * (d_3 - d_s))
    n = noise.at(1.0)
    return xt if n is None else xt + s_t * n


def _step_noise(den: Denoise, x: torch.Tensor, s: float, t: float, process: NoiseProcess, k: int,
                generator: GeneratorArg) -> torch.Tensor:
    lam_s, lam_t = process.lambda_(s), process.lambda_(t)
    h = lam_t - lam_s
    a_s, sig_s = process.alpha(s), process.sigma(s)
    noise = _Increments(x, generator, h, data_form=False)

    def eps(xc: torch.Tensor, tc: float) -> torch.Tensor:
        a, sg = process.alpha(tc), process.sigma(tc)
        return (xc - a * den(xc, tc)) / sg

    def stage(c: float, corr: list[tuple[float, float, torch.Tensor]]) -> tuple[torch.Tensor, float]:
        # x_c = (a_c/a_s) x - 2 s_c (e^{ch}-1) eps_s - sum 2 (c/c_j) s_c ((e^{ch}-1)/(ch) - 1) (eps_j - eps_s) + N_c
        tc = t if c == 1.0 else process.t_of_lambda(lam_s + c * h)
        a_c, s_c = process.alpha(tc), process.sigma(tc)
        out = (a_c / a_s) * x + (-2.0 * s_c * math.expm1(c * h)) * e_s
        for cj, weight, e_j in corr:
            out = out + (-weight * s_c) * (e_j - e_s)
        n = noise.at(c)
        return (out if n is None else out + s_c * n), tc

    def lin_weight(c: float, cj: float) -> float:
        return 2.0 * (c / cj) * (math.expm1(c * h) / (c * h) - 1.0)

    e_s = eps(x, s)
    if k == 1:
        return stage(1.0, [])[0]
    if k == 2:
        (c2,) = NODES[2]
        x2, t2 = stage(c2, [])
        e_2 = eps(x2, t2)
        # The paper's SEEDS-2 weight (1/c2)(e^h - 1), not the exact linear integral.
        return stage(1.0, [(c2, math.expm1(h) / c2, e_2)])[0]
    c2, c3 = NODES[3]
    x2, t2 = stage(c2, [])
    e_2 = eps(x2, t2)
    x3, t3 = stage(c3, [(c2, lin_weight(c3, c2), e_2)])
    e_3 = eps(x3, t3)
    return stage(1.0, [(c3, lin_weight(1.0, c3), e_3)])[0]


def seeds(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
          generator: GeneratorArg = None, *, stages: int = 2, form: str = "data", eta: float = 1.0) -> torch.Tensor:
    """SEEDS-`stages` on the grid, then x = D(x_N, t_N)."""
    check_grid(timesteps)
    if form == "noise" and eta != 1.0:
        raise ValueError(f"params.eta={eta!r}: the noise form of SEEDS is defined for eta = 1 only")
    for s, t in zip(timesteps[:-1], timesteps[1:]):
        if form == "data":
            x = _step_data(denoiser, x, s, t, process, stages, eta, generator)
        else:
            x = _step_noise(denoiser, x, s, t, process, stages, generator)
    return denoiser(x, timesteps[-1])


def _check_form(p) -> None:
    if p["form"] == "noise" and p["eta"] != 1.0:
        raise ValueError(f"params.eta={p['eta']!r}: the noise form of SEEDS is defined for eta = 1 only")


def _register(k: int) -> None:
    def fn(denoiser, x, timesteps, process, generator=None, **params):
        return seeds(denoiser, x, timesteps, process, generator, stages=k, **params)

    def check_eta(value: Any, path: str) -> float:
        return number(0.0, 10.0)(value, path)

    register(NamedSampler(
        name=f"seeds_{k}", fn=fn, nfe=lambda n, p, k=k: k * (n - 1) + 1,
        params={"form": Param("data", choice("data", "noise"), "data or noise prediction form"),
                "eta": Param(1.0, check_eta, "stochasticity (data form); 1 is the paper's SDE")},
        stochastic=lambda p: p["eta"] > 0,
        check=_check_form,
        description=f"SEEDS-{k}: {k}-stage stochastic exponential Runge-Kutta with exact segment noise",
        paper="Gonzalez et al., SEEDS, NeurIPS 2023 (arXiv 2305.14267)"))


for _k in (1, 2, 3):
    _register(_k)
