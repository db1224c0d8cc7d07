"""Near copies (search/near_copies.py): the S³ loop does not spend true evaluations on moves too small to
matter, and keeps every move that can."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from s3search import processes
from s3search.schedule import SolverSchedule, StepSpec
from s3search.search.near_copies import NEAR_COPY_TOLERANCE, NearCopies, distinct

FLOW = processes.get("flow")


def _schedule(ts, eta=0.0, order=2, derivative="taylor") -> SolverSchedule:
    steps = tuple(StepSpec(order=min(order, i + 1), eta=eta, derivative=derivative) for i in range(len(ts) - 1))
    return SolverSchedule(process="flow", timesteps=tuple(ts), steps=steps)


def _moved(ts, i, nats):
    out = list(ts)
    out[i] = FLOW.t_of_lambda(FLOW.lambda_(ts[i]) + nats)
    return out


BASE = [0.999, 0.5948, 0.2837, 0.0806, 0.001118]


def test_a_tiny_grid_move_is_a_near_copy_and_a_real_one_is_not():
    index = NearCopies(FLOW, [_schedule(BASE)])
    assert index.near(_schedule(_moved(BASE, 2, 5e-5)))
    assert index.near(_schedule(_moved(BASE, 1, -0.5 * NEAR_COPY_TOLERANCE)))
    assert not index.near(_schedule(_moved(BASE, 2, 2 * NEAR_COPY_TOLERANCE)))


def test_other_discrete_choices_are_never_near_copies():
    index = NearCopies(FLOW, [_schedule(BASE)])
    assert not index.near(_schedule(BASE, order=1))
    assert not index.near(replace(_schedule(BASE), final="none"))
    assert not index.near(_schedule(BASE, eta=0.3))           # stochastic against deterministic


def test_choices_that_cannot_change_the_output_do_not_hide_a_copy():
    index = NearCopies(FLOW, [_schedule(BASE, order=1)])
    # An order-1 step's derivative rule is never used: the same schedule, a near copy.
    assert index.near(_schedule(_moved(BASE, 3, 1e-4), order=1, derivative="bh2"))


def test_eta_moves_count_like_grid_moves():
    index = NearCopies(FLOW, [_schedule(BASE, eta=0.5)])
    assert index.near(_schedule(BASE, eta=0.5 + 0.5 * NEAR_COPY_TOLERANCE))
    assert not index.near(_schedule(BASE, eta=0.5 + 2 * NEAR_COPY_TOLERANCE))


def test_distinct_keeps_order_and_drops_copies_of_each_other():
    index = NearCopies(FLOW)
    a, b, c = _schedule(BASE), _schedule(_moved(BASE, 2, 1e-5)), _schedule(_moved(BASE, 2, 0.2))
    kept = distinct([(a, 1.0), (b, 2.0), (c, 3.0)], index)
    assert [p for _, p in kept] == [1.0, 3.0]
    assert index.near(b) and index.near(c)


@pytest.mark.parametrize("process", ["vp-linear", "edm", "flow"])
def test_the_index_uses_each_process_own_lambda(process):
    proc = processes.get(process)
    lo, hi = proc.lambda_(proc.t_max), proc.lambda_(proc.t_min)
    ts = [proc.t_of_lambda(x) for x in np.linspace(lo, hi, 5)]
    ts[0], ts[-1] = proc.t_max, proc.t_min
    s = SolverSchedule(process=process, timesteps=tuple(ts), steps=tuple(StepSpec() for _ in ts[1:]))
    index = NearCopies(proc, [s])
    ts2 = list(ts)
    ts2[2] = proc.t_of_lambda(proc.lambda_(ts[2]) + 0.001)
    assert index.near(replace(s, timesteps=tuple(ts2)))
