"""The one integrator: `sample(denoiser, x_T, schedule, generator)` runs any solver schedule.

Every step is the same exponential-integrator update (docs/math.md §2-§4), written in half-logSNR lambda:

    data form:  x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t      * sum_j w_j D_j + sigma_t sqrt(1 - e^{-2 eta h}) z
    noise form: x_t = (alpha_t/alpha_s)           x_s + (1+eta) sigma_t * sum_j w_j eps_j + sigma_t sqrt(eta (e^{2h} - 1)) z

with weights w_j from `coefficients.step_weights` (kernel rate omega = (1+eta) h in the data form, -h in the
noise form). Noise variances are exact for the frozen-model SDE of each form; the corrector re-solves the same
step, with the same z, after adding the new evaluation as a node at u = 1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generator, Optional, Union

import functools
import math

import torch

from . import processes
from .coefficients import step_weights
from .denoisers import DenoiserFn
from .noise import GeneratorArg, NoiseStream
from .processes import NoiseProcess
from .schedule import SolverSchedule, StepSpec

__all__ = ["sample", "Integration", "ModelOutput", "Request"]


@dataclass
class ModelOutput:
    """The model's data prediction at time t, and the state it was evaluated at (for the noise form)."""

    t: float
    lam: float
    x_eval: torch.Tensor
    data: torch.Tensor
    alpha: float
    sigma: float
    _eps: Optional[torch.Tensor] = None

    def value(self, prediction: str) -> torch.Tensor:
        if prediction == "data":
            return self.data
        if self._eps is None:
            self._eps = (self.x_eval - self.alpha * self.data) / self.sigma
        return self._eps


def _output(x: torch.Tensor, t: float, data: torch.Tensor, proc: NoiseProcess) -> ModelOutput:
    return ModelOutput(t, proc.lambda_(t), x, data, proc.alpha(t), proc.sigma(t))


def _evaluate(denoiser: DenoiserFn, x: torch.Tensor, t: float, proc: NoiseProcess) -> ModelOutput:
    return _output(x, t, denoiser(x, t), proc)


def _first_output(schedule: SolverSchedule, data_mean: Any, x: torch.Tensor, proc: NoiseProcess) -> ModelOutput:
    """E[x0 | x_T] taken as 0 (zero-x0) or as the data mean (mean-x0) at t_0, without a model evaluation."""
    t = schedule.timesteps[0]
    if schedule.first_step == "zero-x0":
        data = torch.zeros_like(x)
    else:
        if data_mean is None:
            raise ValueError("first_step='mean-x0' needs a denoiser with a data_mean attribute")
        data = torch.as_tensor(data_mean, dtype=x.dtype, device=x.device).expand_as(x)
    return _output(x, t, data, proc)


def _analytic_first(schedule: SolverSchedule, denoiser: DenoiserFn, x: torch.Tensor,
                    proc: NoiseProcess) -> ModelOutput:
    mean = getattr(denoiser, "data_mean", None) if schedule.first_step == "mean-x0" else None
    return _first_output(schedule, mean, x, proc)


@dataclass(frozen=True)
class _StepPlan:
    """Everything scalar about one step, computed once per schedule: the loop then only combines tensors."""

    prediction: str
    lags: tuple[int, ...]
    decay: float
    coeffs: tuple[float, ...]                 # pref * w_j for the current point, then the lagged ones
    corrected: Optional[tuple[float, ...]]    # the same with the corrector's node (u = 1) appended
    noise_std: float
    # The corrected step as the predicted one plus a correction: c'_j - c_j for the shared points, then the new
    # node's c' (the same z is in both, so no noise term).
    correction: Optional[tuple[float, ...]] = None


def _step_plan(proc: NoiseProcess, ts: tuple[float, ...], i: int, step: StepSpec) -> _StepPlan:
    s, t = ts[i], ts[i + 1]
    lam_s, lam_t = proc.lambda_(s), proc.lambda_(t)
    h = lam_t - lam_s
    alpha_t, sigma_t = proc.alpha(t), proc.sigma(t)
    eta = step.eta
    if step.prediction == "data":
        decay = sigma_t / proc.sigma(s) * math.exp(-eta * h)
        pref, omega = alpha_t, (1.0 + eta) * h
        noise_std = sigma_t * math.sqrt(-math.expm1(-2.0 * eta * h))
    else:
        decay = alpha_t / proc.alpha(s)
        pref, omega = (1.0 + eta) * sigma_t, -h
        noise_std = sigma_t * math.sqrt(eta * math.expm1(2.0 * h))
    # The point `lag` steps back was evaluated at ts[i - lag] (a corrector's evaluation at t is the next
    # step's current point, at the same time), so every node is known before sampling starts.
    nodes = [0.0] + [(proc.lambda_(ts[i - lag]) - lam_s) / h for lag in step.used_lags]
    coeffs = tuple(pref * w for w in step_weights(step.derivative, omega, nodes, corrector=False).tolist())
    corrected = None
    if step.corrector != "none":
        weights = step_weights(step.derivative, omega, nodes + [1.0], corrector=True, lam_s=lam_s)
        corrected = tuple(pref * w for w in weights.tolist())
    correction = None
    if corrected is not None:
        correction = tuple(c - p for c, p in zip(corrected, coeffs)) + (corrected[-1],)
    return _StepPlan(step.prediction, step.used_lags, decay, coeffs, corrected, noise_std, correction)


@functools.lru_cache(maxsize=1024)
def _schedule_plan(schedule: SolverSchedule) -> tuple[_StepPlan, ...]:
    # Cached: a search evaluates one schedule over several batches, and benchmarks repeat it.
    proc = processes.get(schedule.process)
    return tuple(_step_plan(proc, schedule.timesteps, i, step) for i, step in enumerate(schedule.steps))


# A UniC correction not yet applied: the true state is the stored tensor plus sum_j c_j V_j. Its only use is the
# next step's combination (the model was evaluated at the predicted point), so it is folded in there: for
# UniPC order 3 that is 5 batch-sized passes a step instead of 9.
Pending = list[tuple[float, torch.Tensor]]


def _combine(x: torch.Tensor, pending: Pending, plan: _StepPlan, points: list[ModelOutput],
             z: Optional[torch.Tensor]) -> torch.Tensor:
    """decay * (x + pending) + sum_j c_j V_j + noise_std * z."""
    terms: dict[int, list] = {}
    for c, v in pending:
        terms.setdefault(id(v), [0.0, v])[0] += c * plan.decay
    for c, p in zip(plan.coeffs, points):
        v = p.value(plan.prediction)
        terms.setdefault(id(v), [0.0, v])[0] += c
    # One new batch-sized tensor per step, accumulated in place: on CPU each out-of-place add allocates (and
    # page-faults) a fresh buffer, which costs more than the add itself.
    out = x * plan.decay
    for c, v in terms.values():
        if c != 0.0:
            out.add_(v, alpha=c)
    if z is not None and plan.noise_std > 0.0:
        out.add_(z, alpha=plan.noise_std)
    return out


def _correction(plan: _StepPlan, points: list[ModelOutput], predicted: ModelOutput) -> Pending:
    """The corrected x_t minus the predicted one: sum_j (c'_j - c_j) V_j + c'_new V_new."""
    assert plan.correction is not None
    *deltas, c_new = plan.correction
    terms = [(d, p.value(plan.prediction)) for d, p in zip(deltas, points) if d != 0.0]
    return terms + [(c_new, predicted.value(plan.prediction))]


def _applied(x: torch.Tensor, pending: Pending) -> torch.Tensor:
    if not pending:
        return x
    (c0, v0), *rest = pending
    out = torch.add(x, v0, alpha=c0)
    for c, v in rest:
        out.add_(v, alpha=c)
    return out


# What the model is wanted at next: (state x, time t); the answer sent back is D(x, t).
Request = tuple[torch.Tensor, float]


def _run(x: torch.Tensor, schedule: SolverSchedule, generator: GeneratorArg, data_mean: Any,
         draw_ahead: Optional[bool]) -> Generator[Request, torch.Tensor, torch.Tensor]:
    """`sample` as a generator: yields every (x, t) the model is needed at, takes D(x, t), returns the result.

    The caller owns the model calls, so the same run serves `sample` (which calls the denoiser in a loop) and
    a diffusers pipeline (which calls its network between `step`s) with O(1) work per evaluation.
    """
    proc = processes.get(schedule.process)
    current = _first_output(schedule, data_mean, x, proc) if schedule.first_step != "model" else None
    stochastic = sum(1 for step in schedule.steps if step.eta > 0)
    with NoiseStream(x, stochastic, generator, ahead=draw_ahead) as noise:
        return (yield from _integrate(x, schedule, proc, current, noise))


def _integrate(x: torch.Tensor, schedule: SolverSchedule, proc: NoiseProcess, current: Optional[ModelOutput],
               noise: NoiseStream) -> Generator[Request, torch.Tensor, torch.Tensor]:
    ts = schedule.timesteps
    plans = _schedule_plan(schedule)
    # Model outputs at the last few times, oldest first: only as many as the deepest lag needs, so that the
    # batch-sized tensors of older evaluations are freed and their memory reused (fresh memory costs page faults).
    keep = 1 + max((max(step.used_lags, default=0) for step in schedule.steps), default=0)
    history: deque[ModelOutput] = deque(maxlen=keep)
    pending: Pending = []
    for i, step in enumerate(schedule.steps):
        s, t = ts[i], ts[i + 1]
        # Phase 1: the model output at s (reused from the previous step's corrector when it has one).
        if current is None:
            current = _output(x, s, (yield x, s), proc)
        history.append(current)
        plan = plans[i]
        points = [history[-1]] + [history[-1 - lag] for lag in plan.lags]
        z = noise.next() if step.eta > 0 else None
        # Phase 2: predict x_t.
        x_next, pending = _combine(x, pending, plan, points, z), []
        current = None
        # Phase 3: correct with the evaluation at the predicted point, reusing the same noise.
        if plan.corrected is not None:
            predicted = _output(x_next, t, (yield x_next, t), proc)
            pending = _correction(plan, points, predicted)
            if step.corrector == "implicit":
                x_next, pending = _applied(x_next, pending), []
                current = _output(x_next, t, (yield x_next, t), proc)
            else:
                current = predicted
        x = x_next
    x = _applied(x, pending)
    if schedule.final == "none":
        return x
    if current is None:
        current = _output(x, ts[-1], (yield x, ts[-1]), proc)
    return current.data


def _run_schedule(denoiser: DenoiserFn, x: torch.Tensor, schedule: SolverSchedule,
                  generator: GeneratorArg) -> torch.Tensor:
    mean = getattr(denoiser, "data_mean", None) if schedule.first_step == "mean-x0" else None
    run = _run(x, schedule, generator, mean, None)
    try:
        request = next(run)
        while True:
            request = run.send(denoiser(*request))
    except StopIteration as finished:
        return finished.value
    finally:
        run.close()  # a failed model call leaves no noise draw running


class Integration:
    """One run of `sample` on a solver schedule, advanced by the caller one model evaluation at a time.

    `wanted` is the (x, t) at which the data prediction D(x, t) is needed next (None once finished); `give(D)`
    hands it over and advances to the next evaluation; `result` is what `sample` returns, once finished. Each
    `give` does one evaluation's share of the update arithmetic, and the result is bitwise `sample`'s for the
    same x_T, schedule, model outputs and generator (both run the same code). `data_mean` serves
    first_step="mean-x0". `draw_ahead=False` keeps the generator in the caller's thread between evaluations
    (None: the noise module's default, as in `sample`).
    """

    def __init__(self, x_T: torch.Tensor, schedule: SolverSchedule, generator: GeneratorArg = None,
                 data_mean: Any = None, draw_ahead: Optional[bool] = None) -> None:
        if not isinstance(schedule, SolverSchedule):
            raise ValueError(f"schedule must be a SolverSchedule, not {type(schedule).__name__}")
        self.wanted: Optional[Request] = None
        self.result: Optional[torch.Tensor] = None
        self._run = _run(x_T, schedule, generator, data_mean, draw_ahead)
        self._advance(None)

    @property
    def done(self) -> bool:
        return self.wanted is None

    def give(self, data: torch.Tensor) -> None:
        """D(x, t) at `wanted`."""
        if self.wanted is None:
            raise RuntimeError("the run is finished: it wants no more model outputs")
        self._advance(data)

    def close(self) -> None:
        """Stop early (waits for any noise draw in flight)."""
        self._run.close()
        self.wanted = None

    def _advance(self, data: Optional[torch.Tensor]) -> None:
        try:
            with torch.no_grad():
                self.wanted = next(self._run) if data is None else self._run.send(data)
        except StopIteration as finished:
            self.wanted, self.result = None, finished.value
        except BaseException:
            self.close()
            raise


def sample(denoiser: DenoiserFn, x_T: torch.Tensor, schedule: Union[SolverSchedule, "NamedSchedule"],
           generator: GeneratorArg = None) -> torch.Tensor:
    """Run `schedule` from x_T (at the schedule's first time) with the data-prediction model `denoiser`.

    `generator` feeds the stochastic steps: one generator per row of x_T makes each sample independent of the
    batch it is in. A NamedSchedule (a sampler outside the schedule space) runs through its registered function.
    """
    if not isinstance(x_T, torch.Tensor) or x_T.ndim < 1:
        raise ValueError("x_T must be a tensor with a batch dimension")
    if isinstance(schedule, SolverSchedule):
        with torch.no_grad():
            return _run_schedule(denoiser, x_T, schedule, generator)
    from .named import NamedSchedule, run_named  # named samplers are optional to the schedule core

    if isinstance(schedule, NamedSchedule):
        with torch.no_grad():
            return run_named(denoiser, x_T, schedule, generator)
    raise ValueError(f"schedule must be a SolverSchedule or NamedSchedule, not {type(schedule).__name__}")
