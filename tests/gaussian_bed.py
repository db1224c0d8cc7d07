"""A single Gaussian N(mu, diag(s2)): exact denoiser, exact probability-flow ODE, exact moments of linear steps."""

from __future__ import annotations

import math

import numpy as np
import torch

from s3search import processes

MU = torch.tensor([0.7, -1.2, 0.3, 2.0], dtype=torch.float64)
S2 = torch.tensor([0.3, 1.0, 2.0, 0.6], dtype=torch.float64)


def denoiser(process_name: str, calls: list | None = None):
    proc = processes.get(process_name)

    def D(x: torch.Tensor, t: float) -> torch.Tensor:
        if calls is not None:
            calls.append(t)
        a, s = proc.alpha(t), proc.sigma(t)
        gain = a * S2 / (a * a * S2 + s * s)
        return MU + gain * (x - a * MU)

    D.data_mean = MU  # type: ignore[attr-defined]
    return D


def exact_ode(x_s: torch.Tensor, process_name: str, s: float, t: float) -> torch.Tensor:
    """The probability-flow ODE solution from time s to t (docs/math.md §8, VE form applied to x / alpha)."""
    proc = processes.get(process_name)
    sv_s, sv_t = proc.sigma_ve(s), proc.sigma_ve(t)
    ratio = torch.sqrt((S2 + sv_t**2) / (S2 + sv_s**2))
    xbar = MU + ratio * (x_s / proc.alpha(s) - MU)
    return proc.alpha(t) * xbar


def graded_lambda_grid(process_name: str, t_start: float, t_end: float, n: int, order: int) -> list[float]:
    """n steps uniform in lambda, except that the first order-1 warm-up steps are shrunk so their local error
    is O(h^(order+1)): a warm-up step of order j+1 and length h^((order+1)/(j+2)) keeps the method's order."""
    proc = processes.get(process_name)
    l0, l1 = proc.lambda_(t_start), proc.lambda_(t_end)
    h = (l1 - l0) / n
    warm = [h ** ((order + 1) / (j + 2)) * h ** 0 for j in range(order - 1)]
    warm = [min(w, h) for w in warm]
    lams = [l0]
    for w in warm:
        lams.append(lams[-1] + w)
    rest = n - len(warm)
    lams += list(np.linspace(lams[-1], l1, rest + 1)[1:])
    return [proc.t_of_lambda(float(l)) for l in lams]
