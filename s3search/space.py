"""The search space: every per-step choice of a solver schedule, at one NFE or a set of NFE.

The genome *is* the `SolverSchedule`: operators read a schedule, change it, and hand back a valid schedule with
exactly the target NFE. The timestep grid is encoded as per-step increments of the half-logSNR lambda between a
searchable start (at or below t_max) and a searchable end (at or above t_min); grids are perturbed
multiplicatively in those increments, so they stay strictly monotone. Align-Your-Steps tables, for one, start
well below the process's t_max (SDXL's at sigma 14.6) and end above its t_min.

Every operator ends in `_finish`, which (1) makes each step valid for its position (order and lags capped by
the evaluations that exist) and (2) adds/removes steps or changes correctors until the model-evaluation count,
taken from `schedule.evaluation_plan` itself, equals the target. Counting through the contract's own function
keeps the space and the integrator from ever disagreeing about NFE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Iterable, Optional, Sequence

import numpy as np

from . import processes
from .schedule import (CORRECTORS, DERIVATIVES, FINALS, FIRST_STEPS, MAX_ORDER, PREDICTIONS, SolverSchedule,
                       StepSpec, evaluation_plan)

__all__ = ["SpaceOptions", "SearchSpace", "BASE_GRIDS", "base_grid_lambdas", "TARGETS", "target_first_steps",
           "restrict_to_target"]

BASE_GRIDS = ("logsnr", "edm", "time-uniform", "quadratic")
# The runtimes a searched schedule may be meant for (docs/search.md, "Targets"). Each runs every schedule of the
# space bitwise as `sample` does; the diffusers pipeline loop alone pays for a first step without a model
# evaluation: the pipeline calls its network at x_T before the first `step`, and that call is thrown away, so
# such a schedule costs NFE + 1 network calls there. k-diffusion and ComfyUI (a node wrapping `sample_schedule`)
# take mean-x0 given the data mean, which their exports carry.
TARGETS = ("any", "diffusers", "comfyui", "k-diffusion")
_TARGET_FIRST_STEPS: dict[str, tuple[str, ...]] = {"diffusers": ("model",)}
_MUTATION_TRIES = 4
_MIN_WEIGHT = 1e-3          # smallest lambda increment, relative to the mean one: keeps times distinct
_LOG_W_RANGE = 2.5          # flat encoding: log-increment genes map [0, 1] -> [-2.5, 2.5]


def _top_order(derivative: str) -> int:
    """The highest order a derivative scheme has: DPM-Solver++ stops at 3, the trapezoidal rule is one-step."""
    return {"dpmpp": 3, "trapezoid": 1}.get(derivative, MAX_ORDER)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@dataclass(frozen=True)
class SpaceOptions:
    """Which values each choice may take. Defaults cover the whole schedule type except first_step='mean-x0'
    (it needs the model's data mean; add it when the denoiser has one)."""

    predictions: tuple[str, ...] = PREDICTIONS
    max_order: int = 3
    derivatives: tuple[str, ...] = DERIVATIVES
    correctors: tuple[str, ...] = CORRECTORS
    first_steps: tuple[str, ...] = ("model", "zero-x0")
    finals: tuple[str, ...] = FINALS
    eta_max: float = 1.0            # stochastic steps draw eta uniformly from (0, eta_max]
    p_eta_zero: float = 0.7         # probability that a step is an ODE step (eta = 0)
    p_lags: float = 0.1             # probability that a higher-order step uses non-default earlier points
    max_lag: int = 3
    grid_sigma: float = 0.35        # std of the log lambda-increment perturbation
    t_end_span: float = 3.0         # the final time may sit up to this many lambda-nats above t_min (0: fixed)
    t_start_span: float = 2.0       # the first time may sit up to this many lambda-nats below t_max (0: fixed)
    base_grids: tuple[str, ...] = BASE_GRIDS

    def __post_init__(self) -> None:
        for name, allowed, values in (("predictions", PREDICTIONS, self.predictions),
                                      ("derivatives", DERIVATIVES, self.derivatives),
                                      ("correctors", CORRECTORS, self.correctors),
                                      ("first_steps", FIRST_STEPS, self.first_steps),
                                      ("finals", FINALS, self.finals),
                                      ("base_grids", BASE_GRIDS, self.base_grids)):
            if not values:
                raise ValueError(f"options.{name} must not be empty")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"options.{name}={bad[0]!r} must be one of {', '.join(allowed)}")
        if isinstance(self.max_order, bool) or not isinstance(self.max_order, int) \
                or not 1 <= self.max_order <= MAX_ORDER:
            raise ValueError(f"options.max_order={self.max_order!r} must be an integer from 1 to {MAX_ORDER}")
        for name in ("eta_max", "grid_sigma", "t_end_span", "t_start_span"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"options.{name}={v!r} must be a finite number >= 0")
        for name in ("p_eta_zero", "p_lags"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"options.{name}={v!r} must be a probability in [0, 1]")
        if self.max_lag < 1:
            raise ValueError(f"options.max_lag={self.max_lag!r} must be >= 1")
        if not (set(self.correctors) & {"none", "unic"}):
            # Steps of cost 1 are what lets every NFE be reached exactly.
            raise ValueError("options.correctors must include 'none' or 'unic'")

    @classmethod
    def from_dict(cls, doc: dict) -> "SpaceOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"options.{unknown[0]} is not a search-space option")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


def target_first_steps(target: str) -> Optional[tuple[str, ...]]:
    """The first-step rules a target runs at the searched NFE (None: every one)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} must be one of {', '.join(TARGETS)}")
    return _TARGET_FIRST_STEPS.get(target)


def restrict_to_target(space: dict, target: str) -> dict:
    """SpaceOptions fields (as JSON data) narrowed to what `target` runs at the searched NFE.

    Choices the caller left unset are filled with the target's; a choice the caller set that the target does
    not run raises ValueError naming the field, rather than being dropped without a word.
    """
    allowed = target_first_steps(target)
    if allowed is None:
        return dict(space)
    given = space.get("first_steps")
    if given is None:
        return {**space, "first_steps": allowed}
    bad = [f for f in given if f not in allowed]
    if bad:
        raise ValueError(f"options.space.first_steps={bad[0]!r}: target={target!r} does not run it at the searched "
                         f"NFE (it runs {', '.join(allowed)})")
    return dict(space)


def base_grid_lambdas(process: processes.NoiseProcess, kind: str, n: int, t_start: float, t_end: float,
                      rho: float = 7.0) -> np.ndarray:
    """lambda at n+1 times from t_start to t_end on one of the standard grids (DPM-Solver / EDM conventions)."""
    if kind == "logsnr":
        return np.linspace(process.lambda_(t_start), process.lambda_(t_end), n + 1)
    if kind == "edm":
        s0, s1 = process.sigma_ve(t_start), process.sigma_ve(t_end)
        sig = (s0 ** (1 / rho) + np.linspace(0.0, 1.0, n + 1) * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
        return -np.log(sig)
    if kind == "time-uniform":
        return np.array([process.lambda_(float(t)) for t in np.linspace(t_start, t_end, n + 1)])
    if kind == "quadratic":
        ts = np.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1) ** 2
        return np.array([process.lambda_(float(t)) for t in ts])
    raise ValueError(f"grid={kind!r} must be one of {', '.join(BASE_GRIDS)}")


@dataclass(frozen=True)
class _Genome:
    """The schedule's choices with its grid as lambda-increment weights (any positive numbers)."""

    first_step: str
    final: str
    steps: tuple[StepSpec, ...]
    weights: tuple[float, ...]        # one per step
    lam_end: float
    lam_start: Optional[float] = None  # None: the space's t_max


class SearchSpace:
    """Valid solver schedules of one process with NFE in `nfe`, times in [t_min, t_max]."""

    def __init__(self, process: str | processes.NoiseProcess, nfe: int | Iterable[int], *,
                 t_min: float | None = None, t_max: float | None = None,
                 options: SpaceOptions | dict | None = None) -> None:
        self.process = processes.get(process)
        nfes = (nfe,) if isinstance(nfe, int) else tuple(nfe)
        if not nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nfes):
            raise ValueError(f"nfe={nfe!r} must be a positive integer or a non-empty set of them")
        self.nfes: tuple[int, ...] = tuple(sorted(set(nfes)))
        self.t_min = float(self.process.t_min if t_min is None else t_min)
        self.t_max = float(self.process.t_max if t_max is None else t_max)
        self.process.check_time(self.t_min, "t_min")
        self.process.check_time(self.t_max, "t_max")
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min={self.t_min!r} must be below t_max={self.t_max!r}")
        if options is None:
            options = SpaceOptions()
        elif isinstance(options, dict):
            options = SpaceOptions.from_dict(options)
        self.options: SpaceOptions = options
        self.lam_start = self.process.lambda_(self.t_max)
        self.lam_min_end = self.process.lambda_(self.t_min)        # the cleanest end allowed
        # The end may move towards noise by t_end_span nats, but never past the middle of the range.
        span = min(options.t_end_span, 0.5 * (self.lam_min_end - self.lam_start))
        self.lam_max_end = self.lam_min_end - span
        self.t_max_end = self.process.t_of_lambda(self.lam_max_end)  # the noisiest end allowed
        # The start may move towards clean by t_start_span nats, but never past a quarter of the range.
        self.lam_max_start = self.lam_start + min(options.t_start_span, 0.25 * (self.lam_min_end - self.lam_start))
        self.t_min_start = self.process.t_of_lambda(self.lam_max_start)  # the cleanest start allowed
        for n in self.nfes:
            if not self._nfe_reachable(n):
                raise ValueError(f"nfe={n} cannot be reached with first_steps={list(options.first_steps)} "
                                 f"and finals={list(options.finals)}")

    # ----- public operators ---------------------------------------------------------------------------
    def random(self, rng: np.random.Generator | int | None = None, nfe: int | None = None) -> SolverSchedule:
        """A random valid schedule: random choices on a perturbed standard grid."""
        rng = _rng(rng)
        nfe = self._target(nfe, rng)
        o = self.options
        first = str(rng.choice(o.first_steps))
        final = str(rng.choice(o.finals))
        n_steps = int(rng.integers(max(1, (nfe + 1) // 2), nfe + 2))
        steps = tuple(self._random_step(i, rng) for i in range(n_steps))
        lam_end = self._random_lam_end(rng)
        g = _Genome(first, final, steps, (1.0,) * n_steps, lam_end, self._random_lam_start(rng))
        g = self._finish(g, nfe, rng)
        grid = str(rng.choice(o.base_grids))
        weights = self._base_weights(grid, len(g.steps), g.lam_end, g.lam_start)
        weights = weights * np.exp(o.grid_sigma * rng.standard_normal(len(weights)))
        return self._build(replace(g, weights=tuple(weights.tolist())))

    def mutate(self, schedule: SolverSchedule, rng: np.random.Generator | int | None = None,
               n_changes: int | None = None) -> SolverSchedule:
        """A valid neighbour with the same NFE: 1-3 random changes to the grid, a step, or the structure.

        Some changes cannot alter the result (a derivative scheme on a first-order uncorrected step, say): those
        are drawn again, a few times, so that a neighbour is a different sampler.
        """
        rng = _rng(rng)
        nfe = self._nfe_of(schedule)
        original = schedule.canonical_hash()
        for _ in range(_MUTATION_TRIES):
            g = self._genome(schedule)
            for _ in range(int(rng.integers(1, 4)) if n_changes is None else n_changes):
                g = self._mutate_once(g, rng)
            child = self._build(self._finish(g, nfe, rng))
            if child.canonical_hash() != original:
                break
        return child

    def jitter(self, schedule: SolverSchedule, rng: np.random.Generator | int | None = None,
               scale: float = 0.1) -> SolverSchedule:
        """The same steps on a slightly perturbed grid: every log lambda-increment moves by N(0, scale^2) and
        the end by N(0, scale^2) nats. Fine-tunes the grid of a good schedule."""
        rng = _rng(rng)
        nfe = self._nfe_of(schedule)
        g = self._genome(schedule)
        w = np.asarray(g.weights) * np.exp(scale * rng.standard_normal(len(g.weights)))
        lam_end, lam_start = g.lam_end, g.lam_start
        if self.lam_max_end < self.lam_min_end:
            lam_end = float(np.clip(lam_end + scale * rng.standard_normal(), self.lam_max_end, self.lam_min_end))
        if lam_start is not None:   # a grid starting at t_max keeps its start, as published grids do
            lam_start = self._clip_start(lam_start + scale * rng.standard_normal())
        return self._build(self._finish(replace(g, weights=tuple(w.tolist()), lam_end=lam_end, lam_start=lam_start),
                                        nfe, rng))

    def grid_vector(self, schedule: SolverSchedule) -> tuple[np.ndarray, np.ndarray]:
        """The schedule's grid as a point of R^(n+2) and the box it may move in: the log lambda-increment
        weights of its n steps (scale-free), the end's lambda and the start's lambda. `with_grid` inverts it."""
        g = self._genome(schedule)
        logw = np.log(np.asarray(g.weights, dtype=np.float64))
        x = np.concatenate([logw, [g.lam_end, self._start(g)]])
        lo = np.concatenate([logw - 6.0, [min(self.lam_max_end, self.lam_min_end), self.lam_start]])
        hi = np.concatenate([logw + 6.0, [self.lam_min_end, self.lam_max_start]])
        return x, np.stack([lo, hi], axis=1)

    def with_grid(self, schedule: SolverSchedule, x: Sequence[float]) -> SolverSchedule:
        """The schedule's steps and rules on the grid `x` of `grid_vector` (clipped into its box)."""
        g = self._genome(schedule)
        n = len(g.weights)
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (n + 2,) or not np.all(np.isfinite(x)):
            raise ValueError(f"grid vector must hold {n + 2} finite numbers, got shape {x.shape}")
        lam_end = float(np.clip(x[n], min(self.lam_max_end, self.lam_min_end), self.lam_min_end))
        weights = np.exp(np.clip(x[:n] - x[:n].max(), -30.0, 0.0))
        return self._build(replace(g, weights=tuple(weights.tolist()), lam_end=lam_end,
                                   lam_start=self._clip_start(float(x[n + 1]))))

    def restructure(self, schedule: SolverSchedule, first_step: str, final: str,
                    rng: np.random.Generator | int | None = None) -> SolverSchedule:
        """The same steps and grid with another first-step and final rule, repaired back to its NFE.

        An analytical first step or no final denoise frees an evaluation, which the repair spends on an extra
        step; so a hand-designed sampler can be tried with the space's structural options at equal NFE.
        """
        o = self.options
        if first_step not in o.first_steps or final not in o.finals:
            raise ValueError(f"first_step={first_step!r} / final={final!r}: not in this space "
                             f"({list(o.first_steps)} / {list(o.finals)})")
        rng = _rng(rng)
        nfe = self._nfe_of(schedule)
        g = replace(self._genome(schedule), first_step=first_step, final=final)
        return self._build(self._finish(g, nfe, rng))

    def crossover(self, a: SolverSchedule, b: SolverSchedule,
                  rng: np.random.Generator | int | None = None) -> SolverSchedule:
        """A child with a's NFE: steps drawn from either parent (aligned by relative position), grid blended."""
        rng = _rng(rng)
        nfe = self._nfe_of(a)
        ga, gb = self._genome(a), self._genome(b)
        na, nb = len(ga.steps), len(gb.steps)
        n = na if rng.random() < 0.5 else nb
        steps, weights = [], []
        wa = np.asarray(ga.weights) / sum(ga.weights)
        wb = np.asarray(gb.weights) / sum(gb.weights)
        mix = rng.random()
        for i in range(n):
            ia = min(na - 1, round(i * (na - 1) / max(1, n - 1))) if n > 1 else na - 1
            ib = min(nb - 1, round(i * (nb - 1) / max(1, n - 1))) if n > 1 else nb - 1
            steps.append(ga.steps[ia] if rng.random() < 0.5 else gb.steps[ib])
            # Geometric blend of the two grids' relative increments.
            weights.append(float(np.exp(mix * math.log(wa[ia] * na) + (1 - mix) * math.log(wb[ib] * nb))))
        g = _Genome(first_step=ga.first_step if rng.random() < 0.5 else gb.first_step,
                    final=ga.final if rng.random() < 0.5 else gb.final,
                    steps=tuple(steps), weights=tuple(weights),
                    lam_end=mix * ga.lam_end + (1 - mix) * gb.lam_end,
                    lam_start=self._clip_start(mix * self._start(ga) + (1 - mix) * self._start(gb)))
        return self._build(self._finish(g, nfe, rng))

    def contains(self, schedule: SolverSchedule) -> bool:
        """Whether `schedule` is a member of this space (used by tests and to filter warm-start data)."""
        try:
            self.check(schedule)
        except ValueError:
            return False
        return True

    def check(self, schedule: SolverSchedule) -> None:
        """Raise ValueError naming the first field that puts `schedule` outside this space."""
        o = self.options
        if processes.get(schedule.process).name != self.process.name:
            raise ValueError(f"process={schedule.process!r} is not the space's {self.process.name!r}")
        if schedule.nfe not in self.nfes:
            raise ValueError(f"nfe={schedule.nfe} is not one of {list(self.nfes)}")
        tol = 1e-9 * max(1.0, abs(self.t_max))
        # A moved start is stored to seven significant digits (see _build): up to 5e-7 relative below the bound.
        if not self.t_min_start * (1 - 1e-6) <= schedule.timesteps[0] <= self.t_max + tol:
            raise ValueError(f"timesteps[0]={schedule.timesteps[0]!r} must lie in [{self.t_min_start!r}, "
                             f"t_max={self.t_max!r}]")
        if not self.t_min - tol <= schedule.timesteps[-1]:
            raise ValueError(f"timesteps[-1]={schedule.timesteps[-1]!r} is below t_min={self.t_min!r}")
        if schedule.first_step not in o.first_steps:
            raise ValueError(f"first_step={schedule.first_step!r} is not allowed")
        if schedule.final not in o.finals:
            raise ValueError(f"final={schedule.final!r} is not allowed")
        for i, s in enumerate(schedule.steps):
            for name, allowed in (("prediction", o.predictions), ("derivative", o.derivatives),
                                  ("corrector", o.correctors)):
                if getattr(s, name) not in allowed:
                    raise ValueError(f"steps[{i}].{name}={getattr(s, name)!r} is not allowed")
            if s.order > o.max_order:
                raise ValueError(f"steps[{i}].order={s.order} is above max_order={o.max_order}")
            if s.eta > o.eta_max + 1e-12:
                raise ValueError(f"steps[{i}].eta={s.eta} is above eta_max={o.eta_max}")

    # ----- flat encoding (for optuna's TPE / CMA-ES / random samplers) ---------------------------------
    def unit_dim(self, nfe: int) -> int:
        """Length of the [0, 1]^d vector `from_unit` decodes for this NFE."""
        return 4 + 7 * self._max_steps(nfe)

    def from_unit(self, u: Sequence[float], nfe: int) -> SolverSchedule:
        """Decode a vector in [0, 1]^unit_dim(nfe) into a valid schedule (deterministic)."""
        if nfe not in self.nfes:
            raise ValueError(f"nfe={nfe} is not one of {list(self.nfes)}")
        u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0 - 1e-12)
        if u.shape != (self.unit_dim(nfe),):
            raise ValueError(f"u has shape {u.shape}; expected ({self.unit_dim(nfe)},)")
        o = self.options

        def pick(x: float, values: Sequence):
            return values[int(x * len(values))]

        m = self._max_steps(nfe)
        first, final = pick(u[0], o.first_steps), pick(u[1], o.finals)
        n_steps = 1 + int(u[2] * m)
        lam_end = self.lam_min_end + u[3] * (self.lam_max_end - self.lam_min_end)
        steps, weights = [], []
        for i in range(n_steps):
            v = u[4 + 7 * i: 11 + 7 * i]
            derivative = pick(v[2], o.derivatives)
            top = min(o.max_order, i + 1, _top_order(derivative))
            correctors = [c for c in o.correctors if derivative != "dpmpp" or c == "none"] or ["none"]
            eta = 0.0 if v[4] < o.p_eta_zero else o.eta_max * (v[4] - o.p_eta_zero) / (1 - o.p_eta_zero)
            steps.append(self._step(prediction=pick(v[0], o.predictions), order=1 + int(v[1] * top),
                                    derivative=derivative, corrector=pick(v[3], correctors), eta=float(eta)))
            weights.append(math.exp(_LOG_W_RANGE * (2 * v[5] - 1)))
        g = _Genome(first, final, tuple(steps), tuple(weights), lam_end)
        # The repair is deterministic given its generator: seed it from the vector itself.
        seed = int.from_bytes(np.round(u, 9).tobytes()[:8] + bytes(8), "little") % (2**63)
        return self._build(self._finish(g, nfe, np.random.default_rng(seed)))

    # ----- internals ----------------------------------------------------------------------------------
    def _target(self, nfe: int | None, rng: np.random.Generator) -> int:
        if nfe is None:
            return int(rng.choice(self.nfes))
        if nfe not in self.nfes:
            raise ValueError(f"nfe={nfe} is not one of {list(self.nfes)}")
        return nfe

    def _nfe_of(self, schedule: SolverSchedule) -> int:
        nfe = schedule.nfe
        if nfe not in self.nfes:
            raise ValueError(f"schedule nfe={nfe} is not one of the space's {list(self.nfes)}")
        return nfe

    def _max_steps(self, nfe: int) -> int:
        return nfe + 1

    def _nfe_reachable(self, nfe: int) -> bool:
        o = self.options
        lowest_first = 0 if set(o.first_steps) - {"model"} else 1
        lowest_final = 0 if "none" in o.finals else 1
        # One step of cost 1 (corrector none/unic) costs lowest_first + lowest_final; each extra step adds 1.
        return nfe >= lowest_first + (lowest_final if "none" in o.correctors else 1)

    def _random_lam_start(self, rng: np.random.Generator) -> Optional[float]:
        # Half the time at t_max exactly, where most published grids start.
        if self.lam_max_start <= self.lam_start or rng.random() < 0.5:
            return None
        return float(rng.uniform(self.lam_start, self.lam_max_start))

    def _clip_start(self, lam: float) -> Optional[float]:
        lam = float(np.clip(lam, self.lam_start, self.lam_max_start))
        return None if lam <= self.lam_start else lam

    def _start(self, g: _Genome) -> float:
        return self.lam_start if g.lam_start is None else g.lam_start

    def _random_lam_end(self, rng: np.random.Generator) -> float:
        # Half the time at t_min exactly, where most published grids end.
        if self.lam_max_end >= self.lam_min_end or rng.random() < 0.5:
            return self.lam_min_end
        return float(rng.uniform(self.lam_max_end, self.lam_min_end))

    def _random_step(self, i: int, rng: np.random.Generator, corrector: str | None = None) -> StepSpec:
        o = self.options
        derivative = str(rng.choice(o.derivatives))
        top = min(o.max_order, i + 1, _top_order(derivative))
        order = int(rng.integers(1, top + 1))
        if corrector is None:
            corrector = str(rng.choice(o.correctors))
        if derivative == "dpmpp" and corrector != "none":
            corrector = "none"
        eta = 0.0 if rng.random() < o.p_eta_zero else float(rng.uniform(0.0, o.eta_max))
        lags: tuple[int, ...] = ()
        reach = min(i, o.max_lag)
        if order > 1 and reach >= order - 1 and rng.random() < o.p_lags:
            lags = tuple(sorted(int(x) for x in rng.choice(np.arange(1, reach + 1), order - 1, replace=False)))
        return self._step(prediction=str(rng.choice(o.predictions)), order=order, derivative=derivative,
                          corrector=corrector, eta=eta, lags=lags)

    def _step(self, **fields) -> StepSpec:
        """A StepSpec from freely drawn choices, moved to the nearest valid one.

        A corrected trapezoidal step integrates the ODE with data prediction (schedule.py); where the space has
        no data prediction, such a step takes the first other derivative instead.
        """
        step = {**asdict(StepSpec()), **fields}
        if step["derivative"] == "trapezoid":
            step.update(order=1, lags=())
            if step["corrector"] != "none":
                if "data" in self.options.predictions:
                    step.update(eta=0.0, prediction="data")
                else:
                    step["derivative"] = next((d for d in self.options.derivatives
                                               if d not in ("trapezoid", "dpmpp")), "taylor")
        return StepSpec(**step)

    def _base_weights(self, kind: str, n: int, lam_end: float, lam_start: Optional[float] = None) -> np.ndarray:
        t_end = self.process.t_of_lambda(lam_end)
        t_start = self.t_max if lam_start is None else self.process.t_of_lambda(lam_start)
        lam = base_grid_lambdas(self.process, kind, n, t_start, t_end)
        w = np.diff(lam)
        return np.maximum(w, _MIN_WEIGHT * max(float(np.mean(w)), 1e-12))

    def _genome(self, schedule: SolverSchedule) -> _Genome:
        lam = np.array([self.process.lambda_(t) for t in schedule.timesteps])
        w = np.maximum(np.diff(lam), 1e-12)
        lam_end = float(np.clip(lam[-1], min(self.lam_max_end, self.lam_min_end), self.lam_min_end))
        return _Genome(schedule.first_step, schedule.final, schedule.steps, tuple(w.tolist()), lam_end,
                       self._clip_start(float(lam[0])))

    def _mutate_once(self, g: _Genome, rng: np.random.Generator) -> _Genome:
        o = self.options
        kind = rng.choice(["grid", "grid", "step", "step", "step", "structure", "end", "start"])
        steps, weights = list(g.steps), list(g.weights)
        if kind == "grid":
            # Perturb every increment a little, or one a lot.
            if rng.random() < 0.5:
                weights = (np.asarray(weights) * np.exp(0.5 * o.grid_sigma * rng.standard_normal(len(weights))))
            else:
                j = int(rng.integers(len(weights)))
                weights[j] *= math.exp(2 * o.grid_sigma * rng.standard_normal())
            return replace(g, weights=tuple(float(w) for w in weights))
        if kind == "start":
            if self.lam_max_start <= self.lam_start:
                return g
            if rng.random() < 0.3:
                return replace(g, lam_start=self._random_lam_start(rng))
            return replace(g, lam_start=self._clip_start(self._start(g) + 0.3 * rng.standard_normal()))
        if kind == "end":
            return replace(g, lam_end=self._random_lam_end(rng) if rng.random() < 0.3 else float(np.clip(
                g.lam_end + 0.3 * rng.standard_normal(), self.lam_max_end, self.lam_min_end)))
        if kind == "step":
            j = int(rng.integers(len(steps)))
            steps[j] = self._mutate_step(steps[j], j, rng)
            return replace(g, steps=tuple(steps))
        # structure: first/final rule, or insert/delete a step (the NFE repair then re-balances)
        what = rng.choice(["first", "final", "insert", "delete"])
        if what == "first":
            return replace(g, first_step=str(rng.choice(o.first_steps)))
        if what == "final":
            return replace(g, final=str(rng.choice(o.finals)))
        if what == "insert":
            j = int(rng.integers(len(steps) + 1))
            steps.insert(j, self._random_step(j, rng))
            weights.insert(j, float(np.mean(weights)))
        elif len(steps) > 1:
            j = int(rng.integers(len(steps)))
            del steps[j]
            del weights[j]
        return replace(g, steps=tuple(steps), weights=tuple(weights))

    def _mutate_step(self, s: StepSpec, i: int, rng: np.random.Generator) -> StepSpec:
        o = self.options
        field_ = rng.choice(["prediction", "order", "derivative", "corrector", "eta", "lags", "all"])
        fields = asdict(s)
        if field_ == "prediction":
            return self._step(**{**fields, "prediction": str(rng.choice(o.predictions))})
        if field_ == "order":
            order = int(np.clip(s.order + rng.choice([-1, 1]), 1, min(o.max_order, _top_order(s.derivative))))
            return self._step(**{**fields, "order": order, "lags": ()})
        if field_ == "derivative":
            d = str(rng.choice(o.derivatives))
            order = min(s.order, _top_order(d))
            return self._step(**{**fields, "derivative": d, "corrector": "none" if d == "dpmpp" else s.corrector,
                                 "order": order, "lags": s.lags if order == s.order else ()})
        if field_ == "corrector":
            c = str(rng.choice(o.correctors))
            d = s.derivative if c == "none" or s.derivative != "dpmpp" \
                else str(rng.choice([d for d in o.derivatives if d != "dpmpp"] or ["taylor"]))
            order = min(s.order, _top_order(d))
            return self._step(**{**fields, "corrector": c, "derivative": d, "order": order,
                                 "lags": s.lags if order == s.order else ()})
        if field_ == "eta":
            if s.eta == 0.0 or rng.random() < 0.3:
                eta = 0.0 if s.eta > 0 else float(rng.uniform(0.0, o.eta_max))
            else:
                eta = float(np.clip(s.eta * math.exp(0.5 * rng.standard_normal()), 0.0, o.eta_max))
            return self._step(**{**fields, "eta": eta})
        if field_ == "lags":
            reach = min(i, o.max_lag)
            if s.order > 1 and reach >= s.order - 1:
                picks = rng.choice(np.arange(1, reach + 1), s.order - 1, replace=False)
                return replace(s, lags=tuple(sorted(int(x) for x in picks)))
            return replace(s, lags=())
        return self._random_step(i, rng, corrector=s.corrector)

    def _valid_step(self, s: StepSpec, i: int) -> StepSpec:
        """Cap order and lags by the evaluations that exist at position i (never touches the corrector)."""
        o = self.options
        top = min(o.max_order, i + 1, _top_order(s.derivative))
        order = min(s.order, top)
        lags = s.lags if order == s.order else ()
        if lags and max(lags) > i:
            lags = ()
        if order != s.order or lags != s.lags:
            s = replace(s, order=order, lags=lags)
        return s

    @staticmethod
    def _count(first: str, final: str, steps: Sequence[StepSpec]) -> int:
        # evaluation_plan only reads these three fields; counting through it keeps one definition of NFE.
        return sum(evaluation_plan(SimpleNamespace(first_step=first, final=final, steps=steps)))  # type: ignore

    def _finish(self, g: _Genome, nfe: int, rng: np.random.Generator) -> _Genome:
        o = self.options
        first, final = g.first_step, g.final
        steps, weights = list(g.steps), list(g.weights)
        cheap = [c for c in ("none", "unic") if c in o.correctors]
        for _ in range(4 * (nfe + len(steps)) + 8):
            n = self._count(first, final, steps)
            if n == nfe:
                break
            if n < nfe:
                j = int(rng.integers(len(steps) + 1))
                new = self._random_step(j, rng, corrector=str(rng.choice(cheap)))
                if new.corrector != "none" and new.derivative == "dpmpp":
                    new = self._step(**{**asdict(new),
                                        "derivative": "taylor" if "taylor" in o.derivatives else
                                        next(d for d in o.derivatives if d != "dpmpp")})
                steps.insert(j, new)
                w_near = weights[min(j, len(weights) - 1)] if weights else 1.0
                weights.insert(j, float(w_near))
                continue
            implicit = [i for i, s in enumerate(steps) if s.corrector == "implicit"]
            if implicit:
                j = int(rng.choice(implicit))
                steps[j] = replace(steps[j], corrector=str(rng.choice(cheap)))
            elif len(steps) > 1:
                j = int(rng.integers(len(steps)))
                del steps[j]
                del weights[j]
            elif first == "model" and set(o.first_steps) - {"model"}:
                first = str(rng.choice([f for f in o.first_steps if f != "model"]))
            elif final == "denoise" and "none" in o.finals:
                final = "none"
            elif steps[0].corrector == "unic" and "none" in o.correctors:
                steps[0] = replace(steps[0], corrector="none")
            else:
                raise ValueError(f"nfe={nfe} cannot be reached in this space")
        else:
            raise ValueError(f"nfe={nfe}: repair did not converge")
        steps = [self._valid_step(s, i) for i, s in enumerate(steps)]
        assert self._count(first, final, steps) == nfe
        return _Genome(first, final, tuple(steps), tuple(weights), g.lam_end, g.lam_start)

    def _build(self, g: _Genome) -> SolverSchedule:
        w = np.maximum(np.asarray(g.weights, dtype=np.float64), 1e-300)
        w = w / w.sum()
        w = np.maximum(w, _MIN_WEIGHT / len(w))
        w = w / w.sum()
        start = self._start(g)
        lam = start + (g.lam_end - start) * np.concatenate([[0.0], np.cumsum(w)])
        t0 = self.t_max if g.lam_start is None else float(f"{self.process.t_of_lambda(start):.7g}")
        ts = [min(t0, self.t_max)] + [self.process.t_of_lambda(float(x)) for x in lam[1:-1]]
        ts.append(self.t_min if g.lam_end >= self.lam_min_end else self.process.t_of_lambda(float(g.lam_end)))
        # Seven significant digits: crossing a schedule with itself, or re-deriving a grid through lambda, leaves
        # round-off of ~1e-10 that would make the same sampler a "new" schedule (a distinct canonical hash),
        # and a search would spend true evaluations on copies of its best.
        ts = [ts[0]] + [float(f"{t:.7g}") for t in ts[1:]]
        ts = [float(min(max(t, self.t_min), self.t_max)) for t in ts]
        if g.lam_end < self.lam_min_end:   # the end may not move past the range the space allows
            ts[-1] = min(ts[-1], self.t_max_end)
        # Inversion round-off can tie two neighbouring times on very short increments: nudge apart.
        for i in range(1, len(ts)):
            if not ts[i] < ts[i - 1]:
                ts[i] = math.nextafter(ts[i - 1], -math.inf)
        if ts[-1] < self.t_min:
            raise ValueError("grid collapsed below t_min")
        return SolverSchedule(process=self.process.name, timesteps=tuple(ts), steps=g.steps,
                              first_step=g.first_step, final=g.final)
