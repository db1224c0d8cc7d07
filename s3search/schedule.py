"""The solver schedule: every per-step choice of a sampler, as data.

One frozen object serves the integrator, the search space, the predictor features, the database and the API.
Validation happens at construction and names the offending field; `nfe` is derived, never stored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from . import processes

__all__ = [
    "SCHEMA_VERSION",
    "PREDICTIONS",
    "DERIVATIVES",
    "CORRECTORS",
    "FIRST_STEPS",
    "FINALS",
    "MAX_ORDER",
    "StepSpec",
    "SolverSchedule",
    "evaluation_plan",
]

SCHEMA_VERSION = 1
MAX_ORDER = 4
PREDICTIONS = ("data", "noise")
# How the higher-order terms are formed from the model outputs at earlier times:
#   taylor: the interpolating polynomial in lambda, integrated exactly (DEIS / SA-Solver / exact phi functions);
#   dpmpp:  DPM-Solver++ multistep coefficients (2M midpoint rule; 3M as in the reference code), order <= 3;
#   bh1/bh2: UniPC's B(h) variants of the same linear system;
#   trapezoid: the trapezoidal rule on the probability-flow velocity in flow coordinates (time sigma/(alpha+sigma),
#       state x/(alpha+sigma)). A one-step rule: order 1, whose predictor is Euler (= DDIM) and whose corrector
#       averages the velocities at both ends; with corrector implicit it is the Heun step of diffusers'
#       FlowMatchHeunDiscreteScheduler. It integrates the ODE, so a corrected step takes eta = 0, data prediction.
DERIVATIVES = ("taylor", "dpmpp", "bh1", "bh2", "trapezoid")
# none: the next step evaluates the model at the new point.
# unic: evaluate the model at the predicted point, re-solve the step with that point included (order + 1), and
#       reuse that evaluation as the next step's current output (no extra NFE; UniC, SA-Solver corrector).
# implicit: as unic, then evaluate the model again at the corrected point (one extra NFE; PECE).
CORRECTORS = ("none", "unic", "implicit")
# model: evaluate the model at t_0. zero-x0 / mean-x0: take E[x0 | x_T] to be 0 / the data mean at t_0,
# which is nearly exact at high noise and saves one evaluation.
FIRST_STEPS = ("model", "zero-x0", "mean-x0")
# denoise: return D(x_N, t_N) (one rule for every sampler, as k-diffusion's step to sigma = 0); none: return x_N.
FINALS = ("denoise", "none")

Prediction = Literal["data", "noise"]
Derivative = Literal["taylor", "dpmpp", "bh1", "bh2", "trapezoid"]
Corrector = Literal["none", "unic", "implicit"]
FirstStep = Literal["model", "zero-x0", "mean-x0"]
Final = Literal["denoise", "none"]
ProcessName = Literal["edm", "flow", "vp-cosine", "vp-discrete", "vp-linear"]


def _finite_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{path}={value!r} must be finite")
    return float(value)


def _choice(value: Any, allowed: tuple[str, ...], path: str) -> str:
    if value not in allowed:
        raise ValueError(f"{path}={value!r} must be one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class StepSpec:
    """How one step t_i -> t_{i+1} is taken.

    `lags` picks which earlier evaluations enter the higher-order terms (1 = the previous time, 2 = the one
    before, ...); empty means the most recent `order - 1`.
    """

    prediction: Prediction = "data"
    order: int = 1
    derivative: Derivative = "taylor"
    corrector: Corrector = "none"
    eta: float = 0.0
    lags: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.validate("step")

    def validate(self, path: str) -> None:
        _choice(self.prediction, PREDICTIONS, f"{path}.prediction")
        _choice(self.derivative, DERIVATIVES, f"{path}.derivative")
        _choice(self.corrector, CORRECTORS, f"{path}.corrector")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"{path}.order={self.order!r} must be an integer from 1 to {MAX_ORDER}")
        if _finite_number(self.eta, f"{path}.eta") < 0:
            raise ValueError(f"{path}.eta={self.eta!r} must be >= 0")
        if self.derivative == "dpmpp" and self.order > 3:
            raise ValueError(f"{path}.order={self.order} is above 3, the highest order of derivative=dpmpp")
        if self.derivative == "dpmpp" and self.corrector != "none":
            raise ValueError(f"{path}.corrector={self.corrector!r} needs derivative taylor, bh1 or bh2, not dpmpp")
        if self.derivative == "trapezoid":
            if self.order != 1:
                raise ValueError(f"{path}.order={self.order} must be 1 with derivative=trapezoid (a one-step rule)")
            if self.corrector != "none" and self.eta != 0:
                raise ValueError(f"{path}.eta={self.eta!r} must be 0 with derivative=trapezoid and a corrector "
                                 "(the trapezoidal rule integrates the ODE)")
            if self.corrector != "none" and self.prediction != "data":
                raise ValueError(f"{path}.prediction={self.prediction!r} must be data with derivative=trapezoid "
                                 "and a corrector")
        if self.lags:
            if len(self.lags) != self.order - 1:
                raise ValueError(f"{path}.lags={list(self.lags)} must name order-1={self.order - 1} earlier points")
            if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.lags):
                raise ValueError(f"{path}.lags={list(self.lags)} must be positive integers")
            if len(set(self.lags)) != len(self.lags):
                raise ValueError(f"{path}.lags={list(self.lags)} must not repeat a point")

    @property
    def used_lags(self) -> tuple[int, ...]:
        return self.lags or tuple(range(1, self.order))

    def canonical(self) -> "StepSpec":
        """The same step with choices that cannot change its result reset to defaults."""
        lags = tuple(sorted(self.used_lags))
        lags = () if lags == tuple(range(1, self.order)) else lags
        derivative, prediction = self.derivative, self.prediction
        if self.order == 1 and self.corrector == "none":
            derivative = "taylor"
            if self.eta == 0:
                # A deterministic first-order step is DDIM in either form: the data and noise updates are the
                # same map (sigma_t e^h / sigma_s = alpha_t / alpha_s), so they share a hash.
                prediction = "data"
        return replace(self, prediction=prediction, derivative=derivative, lags=lags, eta=float(self.eta))


@dataclass(frozen=True)
class SolverSchedule:
    """A sampler as data: N + 1 times (noisiest first) of a named process and N step specifications."""

    process: ProcessName
    timesteps: tuple[float, ...]
    steps: tuple[StepSpec, ...]
    first_step: FirstStep = "model"
    final: Final = "denoise"
    schema_version: int = SCHEMA_VERSION
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(float(t) if isinstance(t, int) and not isinstance(t, bool) else t
                                                    for t in self.timesteps))
        object.__setattr__(self, "steps", tuple(self.steps))
        self.validate()

    # ----- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version={self.schema_version!r} is not supported (expected {SCHEMA_VERSION})")
        if not isinstance(self.process, str):
            raise ValueError(f"process={self.process!r} must be a process name")
        proc = processes.get(self.process)
        _choice(self.first_step, FIRST_STEPS, "first_step")
        _choice(self.final, FINALS, "final")
        ts = self.timesteps
        if len(ts) < 2:
            raise ValueError(f"timesteps has {len(ts)} values; a schedule needs at least 2")
        for i, t in enumerate(ts):
            _finite_number(t, f"timesteps[{i}]")
            proc.check_time(t, f"timesteps[{i}]")
        for i in range(1, len(ts)):
            if not ts[i] < ts[i - 1]:
                raise ValueError(f"timesteps[{i}]={ts[i]!r} must be below timesteps[{i - 1}]={ts[i - 1]!r} "
                                 "(times run from noisiest to cleanest)")
        if len(self.steps) != len(ts) - 1:
            raise ValueError(f"steps has {len(self.steps)} entries; {len(ts)} timesteps need {len(ts) - 1}")
        for i, step in enumerate(self.steps):
            if not isinstance(step, StepSpec):
                raise ValueError(f"steps[{i}] must be a StepSpec")
            step.validate(f"steps[{i}]")
            # Times t_0 .. t_i each have a model output by step i.
            if max(step.used_lags, default=0) > i:
                need = max(step.used_lags)
                raise ValueError(f"steps[{i}].order={step.order} needs {need} previous evaluations, {i} exist")

    # ----- derived ----------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        """Model evaluations `sample` makes with this schedule."""
        return sum(evaluation_plan(self))

    def canonical(self) -> "SolverSchedule":
        steps = [s.canonical() for s in self.steps]
        last = steps[-1]
        if self.final == "denoise" and last.corrector == "unic":
            # The final output reuses the corrector's evaluation, so the correction itself is never seen.
            steps[-1] = replace(last, corrector="none").canonical()
        return replace(self, steps=tuple(steps), timesteps=tuple(float(t) for t in self.timesteps), name="")

    def canonical_hash(self) -> str:
        """Identical schedules (up to choices that cannot change the output) share this hash."""
        return document_hash(self.canonical().to_dict())

    # ----- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["timesteps"] = list(self.timesteps)
        doc["steps"] = [{**asdict(s), "lags": list(s.lags)} for s in self.steps]
        doc["nfe"] = self.nfe
        return doc

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, doc: Any) -> "SolverSchedule":
        if not isinstance(doc, dict):
            raise ValueError("a solver schedule must be a JSON object")
        allowed = {"schema_version", "process", "timesteps", "steps", "first_step", "final", "name", "nfe"}
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a field of a solver schedule")
        for key in ("process", "timesteps", "steps"):
            if key not in doc:
                raise ValueError(f"{key} is required")
        if not isinstance(doc["timesteps"], list):
            raise ValueError("timesteps must be a list of numbers")
        if not isinstance(doc["steps"], list):
            raise ValueError("steps must be a list of step objects")
        steps = []
        step_fields = {"prediction", "order", "derivative", "corrector", "eta", "lags"}
        for i, s in enumerate(doc["steps"]):
            if not isinstance(s, dict):
                raise ValueError(f"steps[{i}] must be an object")
            bad = sorted(set(s) - step_fields)
            if bad:
                raise ValueError(f"steps[{i}].{bad[0]} is not a field of a step")
            s = dict(s)
            if "lags" in s:
                if not isinstance(s["lags"], list):
                    raise ValueError(f"steps[{i}].lags must be a list of integers")
                s["lags"] = tuple(s["lags"])
            try:
                steps.append(StepSpec(**s))
            except ValueError as e:
                raise ValueError(str(e).replace("step.", f"steps[{i}].", 1)) from None
        sched = cls(
            process=doc["process"],
            timesteps=tuple(doc["timesteps"]),
            steps=tuple(steps),
            first_step=doc.get("first_step", "model"),
            final=doc.get("final", "denoise"),
            schema_version=doc.get("schema_version", SCHEMA_VERSION),
            name=doc.get("name", "") or "",
        )
        if "nfe" in doc and doc["nfe"] != sched.nfe:
            raise ValueError(f"nfe={doc['nfe']!r} does not match the schedule, which makes {sched.nfe} evaluations")
        return sched

    @classmethod
    def from_json(cls, text: str) -> "SolverSchedule":
        return cls.from_dict(parse_json(text))


def document_hash(doc: dict[str, Any]) -> str:
    """Hash of a canonical schedule document (either schedule type): name ignored, times to 12 digits."""
    doc = {k: v for k, v in doc.items() if k != "name"}
    doc["timesteps"] = [float(f"{t:.12g}") for t in doc["timesteps"]]
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_json(text: str) -> Any:
    """json.loads with the ValueError every schedule parser raises."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None


def evaluation_plan(schedule: SolverSchedule) -> list[int]:
    """Model evaluations per phase: entry i is step i's count; the last entry is the final rule's.

    The integrator follows the same plan, so `nfe` and the real count cannot drift apart.
    """
    counts: list[int] = []
    have_current = schedule.first_step != "model"
    for step in schedule.steps:
        n = 0 if have_current else 1
        if step.corrector == "unic":
            n += 1
        elif step.corrector == "implicit":
            n += 2
        have_current = step.corrector != "none"
        counts.append(n)
    counts.append(1 if schedule.final == "denoise" and not have_current else 0)
    return counts
