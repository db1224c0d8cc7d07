"""Align Your Steps (Sabour, Fidler & Kreis 2024; docs/math.md §7): optimise a timestep grid for one denoiser.

Everything here works in the VE noise level sigma = sigma_t / alpha_t, where x~ = x / alpha obeys
x~ = x0 + sigma eps. KL divergences do not change under the invertible map x -> x / alpha nor under a change of
time variable, so the KLUB computed in sigma is the KLUB of the denoiser's own process (VP, EDM or flow), and
the VP denoiser is reached as D_VE(x~, sigma) = D(alpha(t) x~, t) with t = process.t_of_sigma_ve(sigma).

KLUB of one interval [lo, up] (up noisier), up to a constant factor:

    KLUB(lo, up) = int_lo^up sigma^-3 E || D(x_sigma, sigma) - D(x_up, up) ||^2 dsigma,
    x_sigma = x0 + sigma eps,  x_up = x_sigma + sqrt(up^2 - sigma^2) eps'

estimated by importance sampling with pi(sigma) ~ sigma^-3 (1/(sigma^2+c^2) - 1/(up^2+c^2)), the exact integrand
for data N(0, c^2 I). The denoiser takes one scalar time per call, so the times are stratified: K quantiles of pi
(one shared uniform offset each), each with n_samples / K rows, which is also a variance reduction.

The optimiser is the paper's zeroth-order coordinate search: for one interior point at a time, 11 candidates
around it (the current value included), keep the one with the lowest estimated KLUB of its two intervals. All
candidates of one update share their random numbers, so their comparison is not swamped by Monte Carlo noise.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, TextIO

import numpy as np
import torch

from . import grids
from .denoisers import DenoiserFn
from .processes import NoiseProcess

__all__ = [
    "IntervalCost",
    "KLUBObjective",
    "SearchEvent",
    "progress_printer",
    "StageResult",
    "AYSResult",
    "AYSSettings",
    "optimise_with",
    "grid_document",
    "coordinate_search",
    "subdivide",
    "optimise",
    "estimate_klub",
    "gaussian_klub",
    "importance_antiderivative",
    "sample_importance",
]

DataSampler = Callable[[int, torch.Generator], torch.Tensor]


class IntervalCost(Protocol):
    """Costs of intervals (lo, up) in VE sigma, all estimated with the random numbers of `seed`."""

    def __call__(self, intervals: Sequence[tuple[float, float]], seed: int) -> np.ndarray: ...


# ----- the importance density and the Gaussian closed form -----------------------------------------------
def importance_antiderivative(sigma: np.ndarray | float, up: float, c: float) -> np.ndarray:
    """F with F' = sigma^-3 (1/(sigma^2+c^2) - 1/(up^2+c^2)) (partial fractions; log1p avoids cancellation)."""
    s2 = np.asarray(sigma, dtype=np.float64) ** 2
    k = 1.0 / (up * up + c * c)
    return (k - 1.0 / (c * c)) / (2.0 * s2) + np.log1p(c * c / s2) / (2.0 * c**4)


def gaussian_klub(lo: float, up: float, c: float, dim: int = 1) -> float:
    """Exact KLUB(lo, up) for data N(0, c^2 I_dim) and its exact denoiser: E||dD||^2 = c^4 dim g(sigma)."""
    return float(c**4 * dim * (importance_antiderivative(up, up, c) - importance_antiderivative(lo, up, c)))


def sample_importance(lo: float, up: float, c: float, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws of pi on [lo, up] at uniforms u, by bisection in log sigma (float64, to ~1e-15)."""
    f_lo = importance_antiderivative(lo, up, c)
    z = importance_antiderivative(up, up, c) - f_lo
    target = np.asarray(u, dtype=np.float64) * z
    a = np.full(target.shape, math.log(lo))
    b = np.full(target.shape, math.log(up))
    for _ in range(80):  # the bracket halves each time: 80 halvings reach float64 resolution from any range
        mid = 0.5 * (a + b)
        below = importance_antiderivative(np.exp(mid), up, c) - f_lo < target
        a = np.where(below, mid, a)
        b = np.where(below, b, mid)
    return np.exp(0.5 * (a + b))


def _importance_g(sigma: np.ndarray, up: float, c: float) -> np.ndarray:
    # 1/(s^2+c^2) - 1/(up^2+c^2), written as one fraction so it stays accurate as sigma -> up.
    s2 = sigma * sigma
    return (up * up - s2) / ((s2 + c * c) * (up * up + c * c))


# ----- the KLUB objective --------------------------------------------------------------------------------
@dataclass
class KLUBObjective:
    """Monte Carlo KLUB of intervals for one denoiser and data sampler (see the module docstring)."""

    denoiser: DenoiserFn
    process: NoiseProcess
    data_sampler: DataSampler
    n_samples: int = 4096
    n_times: int = 32
    c: float = 0.5
    # Below this VE sigma the grid's intervals cost nothing (see `optimise`); 0 keeps the plain KLUB.
    sigma_floor: float = 0.0
    calls: int = field(default=0, init=False)
    rows: int = field(default=0, init=False)   # denoiser rows evaluated: the optimiser's cost in model work

    def __post_init__(self) -> None:
        if isinstance(self.n_times, bool) or not isinstance(self.n_times, int) or self.n_times < 1:
            raise ValueError(f"n_times={self.n_times!r} must be an integer >= 1")
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < self.n_times:
            raise ValueError(f"n_samples={self.n_samples!r} must be an integer >= n_times={self.n_times}")
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"c={self.c!r} must be a finite number > 0")
        if not (isinstance(self.sigma_floor, (int, float)) and math.isfinite(self.sigma_floor)
                and self.sigma_floor >= 0):
            raise ValueError(f"sigma_floor={self.sigma_floor!r} must be a finite number >= 0")

    def denoise_ve(self, x_ve: torch.Tensor, sigma: float) -> torch.Tensor:
        """D_VE(x~, sigma) = D(alpha x~, t) at the process time t of the VE level sigma."""
        proc = self.process
        t = min(max(proc.t_of_sigma_ve(sigma), proc.t_min), proc.t_max)
        self.calls += 1
        self.rows += int(x_ve.shape[0])
        log_alpha = proc.log_alpha(t)
        return self.denoiser(x_ve if log_alpha == 0.0 else math.exp(log_alpha) * x_ve, t)

    def _draws(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        gen = torch.Generator().manual_seed(int(seed))
        x0 = self.data_sampler(self.n_samples, gen)
        if x0.shape[0] != self.n_samples:
            raise ValueError(f"data_sampler returned {x0.shape[0]} rows for n={self.n_samples}")
        # Noise is drawn on the CPU generator and moved, so a seed means the same draws on every device.
        eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        eps_up = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        offsets = torch.rand(self.n_times, generator=gen, dtype=torch.float64).numpy()
        strata = (np.arange(self.n_times) + offsets) / self.n_times
        return x0, eps, eps_up, strata

    def _one(self, lo: float, up: float, x0: torch.Tensor, eps: torch.Tensor, eps_up: torch.Tensor,
             strata: np.ndarray) -> float:
        # Phase 1: stratified importance draws of sigma; rows are split evenly over the strata.
        sig_k = sample_importance(lo, up, self.c, strata)
        groups = np.array_split(np.arange(self.n_samples), self.n_times)
        sig_rows = np.concatenate([np.full(len(g), s) for g, s in zip(groups, sig_k)])
        col = (-1,) + (1,) * (x0.dim() - 1)
        x_t = x0 + torch.as_tensor(sig_rows, dtype=x0.dtype, device=x0.device).view(col) * eps
        # Phase 2: the denoiser at each sampled sigma (one call per stratum) and at the interval's top.
        d_t = torch.cat([self.denoise_ve(x_t[g[0]:g[-1] + 1], float(s)) for g, s in zip(groups, sig_k)])
        lift = np.sqrt(np.maximum(up * up - sig_rows * sig_rows, 0.0))
        lift_t = torch.as_tensor(lift, dtype=x0.dtype, device=x0.device).view(col)
        d_up = self.denoise_ve(x_t + lift_t * eps_up, up)
        # Phase 3: importance weights ||dD||^2 / g(sigma), times pi's normaliser.
        sq = (d_t - d_up).pow(2).flatten(1).sum(1).to(device="cpu", dtype=torch.float64).numpy()
        z = float(importance_antiderivative(up, up, self.c) - importance_antiderivative(lo, up, self.c))
        return z * float(np.mean(sq / _importance_g(sig_rows, up, self.c)))

    def __call__(self, intervals: Sequence[tuple[float, float]], seed: int) -> np.ndarray:
        x0, eps, eps_up, strata = self._draws(seed)
        out = np.empty(len(intervals))
        with torch.no_grad():
            for j, (lo, up) in enumerate(intervals):
                if not 0 < lo < up:
                    raise ValueError(f"intervals[{j}]=({lo!r}, {up!r}) must satisfy 0 < lo < up")
                floor = float(self.sigma_floor)
                if up <= floor * (1 + 1e-9):
                    out[j] = 0.0
                else:
                    out[j] = self._one(max(float(lo), floor), float(up), x0, eps, eps_up, strata)
        return out


def estimate_klub(cost: IntervalCost, sigmas: Sequence[float], seed: int = 0) -> float:
    """The total KLUB of a grid given as VE sigmas (noisiest first)."""
    s = [float(v) for v in sigmas]
    return float(np.sum(cost([(s[i + 1], s[i]) for i in range(len(s) - 1)], seed)))


# ----- the coordinate search ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchEvent:
    """One coordinate update, reported to the progress callback."""

    stage: int
    sweep: int
    iteration: int            # updates so far over all stages, this one included
    index: int                # position in the grid (noisiest first)
    sigma_before: float
    sigma_after: float
    cost: float               # estimated KLUB of the point's two intervals at sigma_after
    window: float


ProgressCallback = Callable[[SearchEvent], Optional[bool]]  # return True to stop early


def progress_printer(stream: Optional[TextIO] = None, every: int = 1) -> ProgressCallback:
    """A callback that writes one line per `every` updates: stage, sweep, update, point, sigma move, cost."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1")

    def show(ev: SearchEvent) -> None:
        if ev.iteration % every == 0:
            print(f"ays stage {ev.stage} sweep {ev.sweep} update {ev.iteration}: sigma[{ev.index}] "
                  f"{ev.sigma_before:.5g} -> {ev.sigma_after:.5g}  klub {ev.cost:.6g}  window {ev.window:.3g}",
                  file=stream if stream is not None else sys.stderr, flush=True)

    return show


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _candidates(lower: float, current: float, upper: float, window: float, half: int) -> np.ndarray:
    # Candidates uniform in log sigma on each side, out to `window` of the way to the neighbour.
    a, x, b = math.log(lower), math.log(current), math.log(upper)
    frac = window * np.arange(1, half + 1) / half
    logs = np.concatenate([x - frac[::-1] * (x - a), [x], x + frac * (b - x)])
    return np.exp(logs)


def _check_search(s: list[float], free: Optional[Sequence[int]], candidates: int, window: float,
                  min_window: float, decay: float) -> list[int]:
    """Validate coordinate_search's arguments; returns the sorted free indices."""
    if len(s) < 3:
        raise ValueError(f"sigmas has {len(s)} values; a grid with a free interior point needs at least 3")
    if any(not (math.isfinite(v) and v > 0) for v in s) or any(s[i + 1] >= s[i] for i in range(len(s) - 1)):
        raise ValueError("sigmas must be finite, positive and strictly decreasing (noisiest first)")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 3 or candidates % 2 == 0:
        raise ValueError(f"candidates={candidates!r} must be an odd integer >= 3 (the current value is one)")
    if not 0 < min_window <= window < 1:
        raise ValueError(f"window={window!r} and min_window={min_window!r} need 0 < min_window <= window < 1")
    if not 0 < decay <= 1:
        raise ValueError(f"decay={decay!r} must be in (0, 1]")
    idx = list(range(1, len(s) - 1)) if free is None else sorted(set(int(i) for i in free))
    if not idx or any(not 1 <= i <= len(s) - 2 for i in idx):
        raise ValueError(f"free={list(free or [])} must name interior points 1..{len(s) - 2}")
    return idx


def coordinate_search(sigmas: Sequence[float], cost: IntervalCost, *, free: Optional[Sequence[int]] = None,
                      seed: int = 0, candidates: int = 11, window: float = 0.5, min_window: float = 0.02,
                      decay: float = 0.7, max_iterations: int = 300, stage: int = 0, start_iteration: int = 0,
                      callback: Optional[ProgressCallback] = None) -> tuple[tuple[float, ...], int, bool]:
    """Minimise sum_i cost(s_{i+1}, s_i) over the `free` interior points; returns (sigmas, iterations, stopped).

    Sweeps over the free points (Gauss-Seidel). Each point's candidates reach `w` of the way to its neighbours
    (in log sigma); w widens by 1/decay (up to `window`) when an edge candidate wins and narrows by `decay`
    (down to `min_window`) when the current value wins. The search ends after a sweep that moves no point with
    every window at `min_window`, when `max_iterations` updates are spent, or when the callback returns True.
    """
    s = [float(v) for v in sigmas]
    idx = _check_search(s, free, candidates, window, min_window, decay)
    half = candidates // 2
    # One window per point: it widens while the best candidate is at its edge (the optimum lies further out)
    # and narrows when the point stays, so points travel fast early and are resolved finely late.
    win = {i: window for i in idx}
    it, sweep = start_iteration, 0
    while True:
        moved = False
        for i in idx:
            if it - start_iteration >= max_iterations:
                return tuple(s), it - start_iteration, False
            w = win[i]
            cand = _candidates(s[i + 1], s[i], s[i - 1], w, half)
            intervals = [(float(x), s[i - 1]) for x in cand] + [(s[i + 1], float(x)) for x in cand]
            costs = np.asarray(cost(intervals, _seed(seed, stage, it)), dtype=np.float64)
            total = costs[:candidates] + costs[candidates:]
            best = int(np.argmin(total))  # the current value (the middle one) wins unless beaten strictly
            if total[best] >= total[half]:
                best = half
            if best in (0, candidates - 1):
                win[i] = min(w / decay, window)
            elif best == half:
                win[i] = max(w * decay, min_window)
            before, s[i] = s[i], float(cand[best])
            moved = moved or best != half
            it += 1
            if callback is not None and callback(SearchEvent(stage, sweep, it, i, before, s[i],
                                                             float(total[best]), w)):
                return tuple(s), it - start_iteration, True
        if not moved and all(v <= min_window for v in win.values()):
            return tuple(s), it - start_iteration, False
        sweep += 1


def subdivide(sigmas: Sequence[float]) -> tuple[tuple[float, ...], list[int]]:
    """AYS subdivision: keep every point, add the log-midpoint of each interval; returns (sigmas, new indices)."""
    s = [float(v) for v in sigmas]
    out: list[float] = []
    for i in range(len(s) - 1):
        out += [s[i], math.sqrt(s[i] * s[i + 1])]
    out.append(s[-1])
    return tuple(out), list(range(1, len(out) - 1, 2))


# ----- the whole procedure -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageResult:
    steps: int
    sigmas: tuple[float, ...]
    iterations: int


@dataclass(frozen=True)
class AYSResult:
    process: NoiseProcess
    sigmas: tuple[float, ...]          # the finest optimised grid, VE sigma, noisiest first
    stages: tuple[StageResult, ...]    # stage 0 at n steps, then one per subdivision
    iterations: int
    stopped_early: bool
    ends: tuple[float, float]          # the first and last process times, which the search never moves
    model_rows: int = 0                # denoiser rows the Monte Carlo KLUB evaluated (0 for a given `cost`)

    def _times(self, sigmas: Sequence[float]) -> tuple[float, ...]:
        # The ends are kept as given: a round trip through sigma would move them by an ulp, out of range.
        return (self.ends[0],) + grids.from_sigmas(self.process, sigmas)[1:-1] + (self.ends[1],)

    @property
    def timesteps(self) -> tuple[float, ...]:
        return self._times(self.sigmas)

    def grid(self, n: int) -> tuple[float, ...]:
        """Process times for n steps: a stage with exactly n steps, else log-linear interpolation of the finest."""
        for st in self.stages:
            if st.steps == n:
                return self._times(st.sigmas)
        return self._times(grids.loglinear_interp(self.sigmas, n))


def _initial_grid(proc: NoiseProcess, n: int, init: str | Sequence[float], t_start: Optional[float],
                  t_end: Optional[float]) -> tuple[float, ...]:
    """The starting grid: a grid name ("auto": EDM rho = 7, or time-uniform for discrete time) or given times."""
    if isinstance(init, str):
        name = ("time-uniform" if hasattr(proc, "model_time") else "edm") if init == "auto" else init
        if name not in grids.names():
            raise ValueError(f"init={init!r} must be 'auto', a grid name or a list of times")
        return grids.get(name, proc, n, t_start, t_end)
    ts = tuple(float(t) for t in init)
    if len(ts) != n + 1:
        raise ValueError(f"init has {len(ts)} times; n={n} steps need {n + 1}")
    for i, t in enumerate(ts):
        proc.check_time(t, f"init[{i}]")
    return ts


def optimise(denoiser: DenoiserFn, data_sampler: DataSampler, n: int = 10, *,
             process: Optional[NoiseProcess] = None, init: str | Sequence[float] = "auto",
             t_start: Optional[float] = None, t_end: Optional[float] = None, subdivisions: int = 0,
             n_samples: int = 4096, n_times: int = 32, c: float = 0.5, seed: int = 0,
             max_iterations: int = 300, candidates: int = 11, window: float = 0.5, min_window: float = 0.02,
             decay: float = 0.7, sigma_floor: float = 0.0, callback: Optional[ProgressCallback] = None,
             cost: Optional[IntervalCost] = None) -> AYSResult:
    """Optimise an n-step grid by KLUB coordinate search, then subdivide `subdivisions` times (n * 2^k steps).

    `init` is a grid name ("auto": EDM rho = 7, or time-uniform for discrete-time processes, as the paper does)
    or explicit process times. `max_iterations` bounds coordinate updates over all stages; the paper stops
    stage 0 early (the KLUB minimiser is not the KL minimiser), which a callback returning True achieves.
    `sigma_floor` > 0 charges each interval only for its part above that VE sigma: the KLUB's sigma^-3 weight
    makes the intervals next to a small t_end dominate it, so without a floor the search spends the grid on
    noise levels the final denoising step removes anyway (BENCHMARKS.md, "Align Your Steps grids").
    `cost` replaces the Monte Carlo KLUB by another separable interval cost (the tests use closed forms).
    """
    proc = process if process is not None else getattr(denoiser, "process", None)
    if not isinstance(proc, NoiseProcess):
        raise ValueError("process is required when the denoiser does not carry one")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r} must be an integer >= 2 (a grid needs an interior point to optimise)")
    if isinstance(subdivisions, bool) or not isinstance(subdivisions, int) or not 0 <= subdivisions <= 6:
        raise ValueError(f"subdivisions={subdivisions!r} must be an integer from 0 to 6")
    ts = _initial_grid(proc, n, init, t_start, t_end)
    sig = tuple(proc.sigma_ve(t) for t in ts)
    objective = cost if cost is not None else KLUBObjective(denoiser, proc, data_sampler, n_samples, n_times, c,
                                                            sigma_floor)
    opts = dict(seed=seed, candidates=candidates, window=window, min_window=min_window, decay=decay,
                callback=callback)
    stages: list[StageResult] = []
    used, stopped = 0, False
    free: Optional[list[int]] = None
    for stage in range(subdivisions + 1):
        if stage > 0:
            sig, free = subdivide(sig)
        if not stopped and used < max_iterations:
            sig, its, stopped = coordinate_search(sig, objective, free=free, stage=stage, start_iteration=used,
                                                  max_iterations=max_iterations - used, **opts)
            used += its
        else:
            its = 0
        stages.append(StageResult(len(sig) - 1, tuple(sig), its))
    rows = objective.rows if isinstance(objective, KLUBObjective) else 0
    return AYSResult(proc, tuple(sig), tuple(stages), used, stopped, (ts[0], ts[-1]), rows)


# ----- settings shared by `s3search ays` and the search's seeding grids ------------------------------------
@dataclass(frozen=True)
class AYSSettings:
    """The optimiser settings of the `s3search ays` command and of a search's `ays_grids` (BENCHMARKS.md,
    "Align Your Steps grids", measured the defaults). `iterations` bounds the coordinate updates of stage 0."""

    iterations: int = 10
    n_samples: int = 2048
    n_times: int = 32
    c: float = 0.5
    sigma_floor: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "n_samples", "n_times", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
                raise ValueError(f"{name}={v!r} must be an integer >= {0 if name == 'seed' else 1}")
        if self.n_samples < self.n_times:
            raise ValueError(f"n_samples={self.n_samples} must be >= n_times={self.n_times}")
        for name, lowest in (("c", None), ("sigma_floor", 0.0)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v > 0 if lowest is None else v >= lowest)
            if not ok:
                raise ValueError(f"{name}={v!r} must be a finite number {'> 0' if lowest is None else '>= 0'}")

    def to_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "n_samples": self.n_samples, "n_times": self.n_times,
                "c": float(self.c), "sigma_floor": float(self.sigma_floor), "seed": self.seed}


def optimise_with(settings: AYSSettings, denoiser: DenoiserFn, data_sampler: DataSampler, n: int,
                  process: NoiseProcess, t_start: Optional[float] = None, t_end: Optional[float] = None,
                  callback: Optional[ProgressCallback] = None) -> AYSResult:
    """`optimise` at n steps on [t_end, t_start] (default: the process's range) with `settings`."""
    return optimise(denoiser, data_sampler, n, process=process, t_start=t_start, t_end=t_end,
                    n_samples=settings.n_samples, n_times=settings.n_times, c=settings.c, seed=settings.seed,
                    max_iterations=settings.iterations, sigma_floor=settings.sigma_floor, callback=callback)


def grid_document(result: AYSResult, model: str, nfe: int, settings: AYSSettings) -> dict[str, Any]:
    """The JSON document of an optimised grid: VE sigmas and process times (noisiest first) and how it was made."""
    return {"kind": "ays-grid", "model": model, "process": result.process.name, "nfe": int(nfe),
            "steps": len(result.sigmas) - 1, "sigmas": [float(v) for v in result.sigmas],
            "timesteps": [float(t) for t in result.timesteps], "iterations": result.iterations,
            "model_rows": result.model_rows, "settings": settings.to_dict()}
