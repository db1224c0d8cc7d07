"""Schedule -> numbers: a per-step sequence and a fixed-length vector.

The per-step rows carry the step's choices and where it sits on the half-logSNR axis (lambda, h, the ratio to
the previous h, which is what the multistep coefficients depend on). The fixed vector is the global summary,
the first `max_steps` rows padded with zeros (a mask column says which are real), and the last three rows again
aligned from the end, so schedules of different NFE share columns and one predictor can serve several NFE.

Beyond the raw choices, rows and summary carry what the numerical analysis of a step says its local error
depends on: the effective order (one more with a corrector), log h^(p+1) times the extrapolation constant of
the multistep nodes, the nodes' spacing in units of h, eta * h, and long high-order steps; the summary adds the
schedule's measured error on Gaussian test data (probe.py), which every choice feeds into at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from s3search import processes
from s3search.schedule import CORRECTORS, DERIVATIVES, FINALS, FIRST_STEPS, MAX_ORDER, SolverSchedule, evaluation_plan

from .probe import PROBE_NAMES, probe_errors

__all__ = ["FeatureSpec", "step_features", "global_features", "vector", "sequence", "matrix", "sequences",
           "STEP_NAMES", "GLOBAL_NAMES"]

STEP_NAMES: tuple[str, ...] = (
    ("real", "data_prediction", "order")
    + tuple(f"order={k}" for k in range(1, MAX_ORDER + 1))
    + tuple(f"derivative={d}" for d in DERIVATIVES)
    + tuple(f"corrector={c}" for c in CORRECTORS)
    + ("eta", "stochastic", "custom_lags", "max_lag", "lambda_s", "lambda_t", "h", "log_h", "log_h_ratio",
       "position", "is_last", "cost")
    # What the local error of a step depends on (see _local_error_terms).
    + ("effective_order", "order_x_h", "log_local_error", "log_extrapolation", "log_far_node", "log_near_node",
       "eta_x_h", "noise_injected", "corrector_x_h", "noise_x_h", "noise_x_lambda_t")
)
GLOBAL_NAMES: tuple[str, ...] = (
    ("nfe", "num_steps")
    + tuple(f"first_step={f}" for f in FIRST_STEPS)
    + tuple(f"final={f}" for f in FINALS)
    + ("lambda_start", "lambda_end", "mean_order", "frac_data", "frac_unic", "frac_implicit", "frac_stochastic",
       "mean_eta", "min_log_h", "max_log_h", "std_log_h", "first_h", "last_h")
    + ("lambda_coverage", "max_h_order3", "max_order_x_h", "max_log_local_error", "sum_log_local_error",
       "max_log_extrapolation", "sum_eta_x_h", "max_h_noise", "last_residual_sigma", "first_step_skip_x_h",
       "max_abs_log_h_ratio")
    + PROBE_NAMES
)
_N_TAIL = 3
FEATURE_VERSION = 3          # bump when the columns change: a saved predictor only fits its own columns


@dataclass(frozen=True)
class FeatureSpec:
    max_steps: int = 16
    version: int = FEATURE_VERSION

    def __post_init__(self) -> None:
        if self.version != FEATURE_VERSION:
            raise ValueError(f"feature_spec.version={self.version!r} is not supported (this code builds version "
                             f"{FEATURE_VERSION}); refit the predictor")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "FeatureSpec":
        # Specs saved before versioning had no version field: they describe version 1's columns.
        return cls(**{"version": 1, **doc})

    @property
    def step_dim(self) -> int:
        return len(STEP_NAMES)

    @property
    def global_dim(self) -> int:
        return len(GLOBAL_NAMES)

    @property
    def vector_dim(self) -> int:
        return self.global_dim + (self.max_steps + _N_TAIL) * self.step_dim


def _lambdas(s: SolverSchedule) -> np.ndarray:
    proc = processes.get(s.process)
    return np.array([proc.lambda_(t) for t in s.timesteps], dtype=np.float64)


def _one_hot(value: str, values: Sequence[str]) -> list[float]:
    return [1.0 if value == v else 0.0 for v in values]


def _extrapolation_constant(nodes: Sequence[float], x: float) -> float:
    """Sum of |Lagrange basis| at x: how much the polynomial through `nodes` amplifies errors at x.

    1 for a single node; it grows quickly when a high-order step reaches far past unevenly spaced nodes,
    which is where multistep formulas turn unstable.
    """
    total = 0.0
    for j, xj in enumerate(nodes):
        term = 1.0
        for k, xk in enumerate(nodes):
            if k != j:
                term *= (x - xk) / (xj - xk)
        total += abs(term)
    return total


def _local_error_terms(s: SolverSchedule, lam: np.ndarray, i: int) -> tuple[float, float, float, float, float]:
    """(effective order, log local-error proxy, log extrapolation constant, log far / near node distance in h).

    A step of order p (p + 1 with a corrector, which adds the new point) has local error ~ C h^(p + 1); C grows
    with the extrapolation constant of the nodes the step interpolates through.
    """
    st = s.steps[i]
    h = max(float(lam[i + 1] - lam[i]), 1e-12)
    p = st.order + (1 if st.corrector != "none" else 0)
    nodes = [float(lam[i])] + [float(lam[i - g]) for g in st.used_lags]
    extrap = _extrapolation_constant(nodes, float(lam[i + 1]))
    dist = [(nodes[0] - x) / h for x in nodes[1:]]
    far = math.log(max(dist)) if dist else 0.0
    near = math.log(min(dist)) if dist else 0.0
    return float(p), (p + 1) * math.log(h) + math.log(extrap), math.log(extrap), far, near


def step_features(s: SolverSchedule, lam: np.ndarray | None = None) -> np.ndarray:
    """[num_steps, step_dim] rows, one per step."""
    lam = _lambdas(s) if lam is None else lam
    h = np.diff(lam)
    cost = evaluation_plan(s)
    n = len(s.steps)
    rows = []
    for i, st in enumerate(s.steps):
        ratio = math.log(h[i] / h[i - 1]) if i > 0 and h[i - 1] > 0 and h[i] > 0 else 0.0
        p_eff, log_err, log_extrap, far, near = _local_error_terms(s, lam, i)
        noise = 1.0 if st.prediction == "noise" else 0.0
        rows.append([1.0, 1.0 if st.prediction == "data" else 0.0, st.order / MAX_ORDER]
                    + _one_hot(str(st.order), [str(k) for k in range(1, MAX_ORDER + 1)])
                    + _one_hot(st.derivative, DERIVATIVES) + _one_hot(st.corrector, CORRECTORS)
                    + [float(st.eta), 1.0 if st.eta > 0 else 0.0, 1.0 if st.lags else 0.0,
                       max(st.used_lags, default=0) / MAX_ORDER, lam[i], lam[i + 1], h[i],
                       math.log(max(h[i], 1e-12)), ratio, i / max(1, n - 1), 1.0 if i == n - 1 else 0.0,
                       float(cost[i])]
                    # The eta-family step's fresh noise has std sigma_t sqrt(1 - exp(-2 eta h)).
                    + [p_eff, p_eff * h[i], log_err, log_extrap, far, near, st.eta * h[i],
                       math.sqrt(max(0.0, 1.0 - math.exp(-2.0 * st.eta * h[i]))),
                       h[i] if st.corrector != "none" else 0.0, noise * h[i], noise * lam[i + 1]])
    return np.asarray(rows, dtype=np.float64)


def global_features(s: SolverSchedule, lam: np.ndarray | None = None) -> np.ndarray:
    lam = _lambdas(s) if lam is None else lam
    h = np.diff(lam)
    log_h = np.log(np.maximum(h, 1e-12))
    steps = s.steps
    n = len(steps)
    proc = processes.get(s.process)
    full = proc.lambda_(proc.t_min) - proc.lambda_(proc.t_max)
    terms = [_local_error_terms(s, lam, i) for i in range(n)]
    log_err = np.array([t[1] for t in terms])
    p_eff = np.array([t[0] for t in terms])
    high = [h[i] for i in range(n) if p_eff[i] >= 3]
    noisy = [h[i] for i in range(n) if steps[i].prediction == "noise"]
    ratios = np.abs(np.diff(log_h)) if n > 1 else np.zeros(1)
    # final='none' returns x_N, which still carries noise of VE std exp(-lambda_end); 'denoise' removes it.
    residual = -lam[-1] if s.final == "none" else 0.0
    # zero-x0 / mean-x0 replace D(x_T) by a guess; the first step's weight on it is 1 - exp(-h_0).
    skip = (1.0 - math.exp(-h[0])) if s.first_step != "model" else 0.0
    return np.asarray(
        [float(s.nfe), float(n)] + _one_hot(s.first_step, FIRST_STEPS) + _one_hot(s.final, FINALS)
        + [lam[0], lam[-1], sum(st.order for st in steps) / n, sum(st.prediction == "data" for st in steps) / n,
           sum(st.corrector == "unic" for st in steps) / n, sum(st.corrector == "implicit" for st in steps) / n,
           sum(st.eta > 0 for st in steps) / n, sum(st.eta for st in steps) / n,
           float(log_h.min()), float(log_h.max()), float(log_h.std()), h[0], h[-1]]
        + [(lam[-1] - lam[0]) / full if full > 0 else 0.0, max(high, default=0.0), float((p_eff * h).max()),
           float(log_err.max()), float(np.logaddexp.reduce(log_err)), max(t[2] for t in terms),
           float(sum(st.eta * h[i] for i, st in enumerate(steps))), max(noisy, default=0.0), residual, skip,
           float(ratios.max())]
        + probe_errors(s).tolist(),
        dtype=np.float64)


def vector(s: SolverSchedule, spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """The fixed-length vector of one schedule."""
    if len(s.steps) > spec.max_steps:
        raise ValueError(f"schedule has {len(s.steps)} steps; the feature spec holds max_steps={spec.max_steps}")
    lam = _lambdas(s)
    rows = step_features(s, lam)
    head = np.zeros((spec.max_steps, spec.step_dim))
    head[: len(rows)] = rows
    tail = np.zeros((_N_TAIL, spec.step_dim))
    k = min(_N_TAIL, len(rows))
    tail[_N_TAIL - k:] = rows[len(rows) - k:]
    return np.concatenate([global_features(s, lam), head.ravel(), tail.ravel()])


def sequence(s: SolverSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(per-step rows [num_steps, step_dim], global row [global_dim])."""
    lam = _lambdas(s)
    return step_features(s, lam), global_features(s, lam)


def matrix(schedules: Sequence[SolverSchedule], spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    return np.stack([vector(s, spec) for s in schedules]) if schedules else np.zeros((0, spec.vector_dim))


def sequences(schedules: Sequence[SolverSchedule], max_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded per-step tensor [B, max_steps, step_dim], step counts [B], globals [B, global_dim]."""
    b = len(schedules)
    steps = np.zeros((b, max_steps, len(STEP_NAMES)))
    lengths = np.zeros(b, dtype=np.int64)
    glob = np.zeros((b, len(GLOBAL_NAMES)))
    for i, s in enumerate(schedules):
        if len(s.steps) > max_steps:
            raise ValueError(f"schedules[{i}] has {len(s.steps)} steps; max_steps={max_steps}")
        rows, g = sequence(s)
        steps[i, : len(rows)] = rows
        lengths[i] = len(rows)
        glob[i] = g
    return steps, lengths, glob
