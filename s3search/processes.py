"""Noise processes: x_t = alpha(t) x0 + sigma(t) eps, with half-logSNR lambda = log(alpha / sigma).

Every coefficient of an update rule is computed from these functions in float64 on Python floats; tensors
never pass through here. Each process declares [t_min, t_max], the range grids and searches use by default,
and `t_top`, the largest time a schedule may use (t_max, except for flow: see RectifiedFlow).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["NoiseProcess", "VPLinear", "VPCosine", "VPDiscrete", "EDM", "RectifiedFlow", "FLOW_T_TOP", "get",
           "names"]


class NoiseProcess(ABC):
    """A forward process given by alpha(t), sigma(t); t decreases while sampling."""

    name: str
    t_min: float
    t_max: float

    @abstractmethod
    def log_alpha(self, t: float) -> float: ...

    @abstractmethod
    def sigma(self, t: float) -> float: ...

    @abstractmethod
    def t_of_lambda(self, lam: float) -> float:
        """Inverse of `lambda_`: the time whose half-logSNR is `lam`."""

    def alpha(self, t: float) -> float:
        return math.exp(self.log_alpha(t))

    def lambda_(self, t: float) -> float:
        return self.log_alpha(t) - math.log(self.sigma(t))

    def sigma_ve(self, t: float) -> float:
        """The equivalent EDM / VE noise level sigma / alpha = exp(-lambda)."""
        return math.exp(-self.lambda_(t))

    def t_of_sigma_ve(self, sigma_ve: float) -> float:
        return self.t_of_lambda(-math.log(sigma_ve))

    @property
    def t_top(self) -> float:
        """The largest time a schedule may use."""
        return self.t_max

    def check_time(self, t: float, field: str) -> None:
        tol = 1e-9 * max(1.0, abs(self.t_top))
        if not (self.t_min - tol <= t <= self.t_top + tol):
            raise ValueError(f"{field}={t!r} is outside the {self.name} time range [{self.t_min}, {self.t_top}]")


def _vp_sigma(log_alpha: float) -> float:
    # sqrt(1 - alpha^2) without cancellation near alpha = 1.
    return math.sqrt(-math.expm1(2.0 * log_alpha))


def _vp_log_alpha_of_lambda(lam: float) -> float:
    # alpha^2 = 1 / (1 + exp(-2 lambda))
    return -0.5 * float(np.logaddexp(0.0, -2.0 * lam))


@dataclass(frozen=True)
class VPLinear(NoiseProcess):
    """VP-SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0), t in [t_min, 1] (Song et al.; DPM-Solver)."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "vp-linear"

    def log_alpha(self, t: float) -> float:
        return -0.25 * t * t * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sigma(self, t: float) -> float:
        return _vp_sigma(self.log_alpha(t))

    def t_of_lambda(self, lam: float) -> float:
        log_alpha = _vp_log_alpha_of_lambda(lam)
        # Root of (b1 - b0)/4 t^2 + b0/2 t + log_alpha = 0, written to avoid cancellation.
        d = self.beta_1 - self.beta_0
        return -2.0 * log_alpha / (self.beta_0 / 2.0 + math.sqrt(self.beta_0**2 / 4.0 - d * log_alpha))


@dataclass(frozen=True)
class VPCosine(NoiseProcess):
    """Cosine schedule of Nichol & Dhariwal; t_max stops short of the singularity at t = 1, as DPM-Solver does."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    name: str = "vp-cosine"

    def _log_alpha_0(self) -> float:
        return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t: float) -> float:
        return math.log(math.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0()

    def sigma(self, t: float) -> float:
        return _vp_sigma(self.log_alpha(t))

    def t_of_lambda(self, lam: float) -> float:
        log_alpha = _vp_log_alpha_of_lambda(lam)
        return 2.0 * (1.0 + self.s) / math.pi * math.acos(math.exp(log_alpha + self._log_alpha_0())) - self.s


@dataclass(frozen=True)
class VPDiscrete(NoiseProcess):
    """A discrete-time VP model (DDPM, 1000 steps): step n in 0..N-1 sits at t = (n + 1) / N.

    log alpha is interpolated piecewise-linearly in t between the steps, as in DPM-Solver's discrete schedule,
    so every continuous-time rule runs on it; `model_time(t)` gives the network's (fractional) step index.
    """

    betas: tuple[float, ...] = tuple(np.linspace(1e-4, 0.02, 1000).tolist())
    name: str = "vp-discrete"

    def __post_init__(self) -> None:
        log_alphas = 0.5 * np.cumsum(np.log1p(-np.asarray(self.betas, dtype=np.float64)))
        n = len(self.betas)
        object.__setattr__(self, "_t", np.arange(1, n + 1, dtype=np.float64) / n)
        object.__setattr__(self, "_log_alpha", log_alphas)
        object.__setattr__(self, "_lambda", log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas)))

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0 / len(self.betas)

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return 1.0

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> "VPDiscrete":
        """The Stable Diffusion beta schedule."""
        return cls(betas=tuple((np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2).tolist()))

    def log_alpha(self, t: float) -> float:
        return float(np.interp(t, self._t, self._log_alpha))

    def sigma(self, t: float) -> float:
        return _vp_sigma(self.log_alpha(t))

    def t_of_lambda(self, lam: float) -> float:
        log_alpha = _vp_log_alpha_of_lambda(lam)
        # log alpha decreases with t: interpolate on the reversed arrays.
        return float(np.interp(-log_alpha, -self._log_alpha, self._t))

    def model_time(self, t: float) -> float:
        """The network's step index for continuous time t (0 at t = 1/N, N-1 at t = 1)."""
        return (t - 1.0 / len(self.betas)) * len(self.betas)

    def __hash__(self) -> int:
        return hash((self.name, self.betas[0], self.betas[-1], len(self.betas)))


@dataclass(frozen=True)
class EDM(NoiseProcess):
    """Karras et al.'s VE parametrisation: alpha = 1, sigma = t, so t is the noise level itself."""

    t_min: float = 0.002
    t_max: float = 80.0
    name: str = "edm"

    def log_alpha(self, t: float) -> float:
        return 0.0

    def sigma(self, t: float) -> float:
        return t

    def t_of_lambda(self, lam: float) -> float:
        return math.exp(-lam)


# t = 1 is pure noise, where lambda = -inf and no exponential-integrator step can start. diffusers' UniPC moves a
# flow schedule's first sigma from 1 to 1 - 1e-6 for that reason; the flow process reaches that far and no
# further, and a pipeline's sigma 1 (FlowMatchEuler, FLUX) maps there (grids.from_flow_sigmas).
FLOW_T_TOP = 1.0 - 1e-6


@dataclass(frozen=True)
class RectifiedFlow(NoiseProcess):
    """Linear interpolation x_t = (1 - t) x0 + t eps (rectified flow / flow matching models).

    [t_min, t_max] is the default range of grids and searches (t_max = 1 - 1/1000, DPMSolverMultistep's first
    unshifted flow sigma). Schedules may go up to t_top = FLOW_T_TOP, where a pipeline schedule that starts at
    sigma 1 starts here.
    """

    t_min: float = 1e-3
    t_max: float = 0.999
    name: str = "flow"

    @property
    def t_top(self) -> float:
        return max(FLOW_T_TOP, self.t_max)

    def check_time(self, t: float, field: str) -> None:
        if isinstance(t, (int, float)) and self.t_top + 1e-9 < t <= 1.0:
            raise ValueError(f"{field}={t!r} is outside the flow time range [{self.t_min}, {self.t_top}]: t = 1 "
                             f"is pure noise (lambda = -inf); a pipeline's sigma 1 runs from t = {self.t_top} "
                             "(grids.from_flow_sigmas)")
        super().check_time(t, field)

    def log_alpha(self, t: float) -> float:
        return math.log1p(-t)

    def sigma(self, t: float) -> float:
        return t

    def t_of_lambda(self, lam: float) -> float:
        return 1.0 / (1.0 + math.exp(lam))


_REGISTRY: dict[str, Callable[[], NoiseProcess]] = {
    "vp-linear": VPLinear,
    "vp-cosine": VPCosine,
    "vp-discrete": VPDiscrete,
    "edm": EDM,
    "flow": RectifiedFlow,
}
_CACHE: dict[str, NoiseProcess] = {}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | NoiseProcess) -> NoiseProcess:
    """The process registered under `name` (instances pass through unchanged)."""
    if isinstance(name, NoiseProcess):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"process={name!r} is unknown; known processes: {', '.join(names())}")
    if name not in _CACHE:
        _CACHE[name] = _REGISTRY[name]()
    return _CACHE[name]
