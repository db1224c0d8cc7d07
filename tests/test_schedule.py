"""The solver-schedule type: validation names the field, JSON round trips, NFE is derived, hashing is canonical."""

import json
import math

import pytest

from s3search import SolverSchedule, StepSpec
from s3search.schedule import evaluation_plan

TS = (80.0, 10.0, 1.0, 0.1, 0.002)


def make(**kw):
    doc = dict(process="edm", timesteps=TS, steps=tuple(StepSpec() for _ in range(4)))
    doc.update(kw)
    return SolverSchedule(**doc)


def test_round_trip_json():
    s = make(steps=(StepSpec(), StepSpec(order=2, derivative="dpmpp"), StepSpec(order=3, eta=0.5, corrector="unic"),
                    StepSpec(prediction="noise", order=2, lags=(2,))), first_step="zero-x0")
    again = SolverSchedule.from_json(s.to_json())
    assert again == s
    assert json.loads(s.to_json())["nfe"] == s.nfe


@pytest.mark.parametrize("change, field", [
    (dict(timesteps=(80.0, 10.0, 10.0, 0.1, 0.002)), "timesteps[2]"),
    (dict(timesteps=(80.0, 10.0, 20.0, 0.1, 0.002)), "timesteps[2]"),
    (dict(timesteps=(80.0, math.nan, 1.0, 0.1, 0.002)), "timesteps[1]"),
    (dict(timesteps=(800.0, 10.0, 1.0, 0.1, 0.002)), "timesteps[0]"),
    (dict(process="vp-unknown"), "process"),
    (dict(first_step="guess"), "first_step"),
    (dict(final="sometimes"), "final"),
    (dict(timesteps=(80.0, 1.0, 0.002)), "steps"),
])
def test_invalid_schedule_names_field(change, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make(**change)


@pytest.mark.parametrize("step_kw, field", [
    (dict(order=5), "order"),
    (dict(order=0), "order"),
    (dict(eta=-0.1), "eta"),
    (dict(eta=math.nan), "eta"),
    (dict(eta=math.inf), "eta"),
    (dict(prediction="score"), "prediction"),
    (dict(derivative="central"), "derivative"),
    (dict(corrector="maybe"), "corrector"),
    (dict(order=4, derivative="dpmpp"), "order"),
    (dict(order=2, derivative="dpmpp", corrector="unic"), "corrector"),
    (dict(order=3, lags=(1,)), "lags"),
    (dict(order=2, lags=(0,)), "lags"),
])
def test_invalid_step_names_field(step_kw, field):
    with pytest.raises(ValueError, match=field):
        StepSpec(**step_kw)


def test_order_larger_than_history_is_rejected_with_counts():
    steps = (StepSpec(), StepSpec(order=2), StepSpec(order=4), StepSpec())
    with pytest.raises(ValueError, match=r"steps\[2\]\.order=4 needs 3 previous evaluations, 2 exist"):
        make(steps=steps)


def test_from_json_errors_name_fields():
    good = json.loads(make().to_json())
    bad = dict(good, steps=[dict(good["steps"][0], eta=-1)] + good["steps"][1:])
    with pytest.raises(ValueError, match=r"steps\[0\]\.eta"):
        SolverSchedule.from_dict(bad)
    with pytest.raises(ValueError, match="colour"):
        SolverSchedule.from_dict(dict(good, colour="red"))
    with pytest.raises(ValueError, match="nfe"):
        SolverSchedule.from_dict(dict(good, nfe=1))
    with pytest.raises(ValueError, match="JSON"):
        SolverSchedule.from_json("{not json")


def test_nfe_counts_every_phase():
    assert make().nfe == 5  # 4 steps + final denoise
    assert make(first_step="zero-x0").nfe == 4
    assert make(final="none").nfe == 4
    unic = (StepSpec(corrector="unic"),) * 3 + (StepSpec(),)
    assert make(steps=unic).nfe == 5  # the corrector's evaluation is reused by the next step
    implicit = (StepSpec(corrector="implicit"),) + (StepSpec(),) * 3
    assert make(steps=implicit).nfe == 6
    # t_0 and its corrector; two corrector-only steps; a step reusing the last one; the final denoise.
    assert evaluation_plan(make(steps=unic)) == [2, 1, 1, 0, 1]


def test_canonical_hash_ignores_choices_without_effect():
    a = make(steps=(StepSpec(derivative="bh2"), StepSpec(), StepSpec(order=2, lags=(1,)), StepSpec()))
    b = make(steps=(StepSpec(), StepSpec(), StepSpec(order=2), StepSpec()))
    assert a.canonical_hash() == b.canonical_hash()
    c = make(steps=(StepSpec(), StepSpec(), StepSpec(order=2, eta=0.1), StepSpec()))
    assert c.canonical_hash() != b.canonical_hash()


def test_deterministic_first_order_steps_hash_alike_in_both_forms():
    # DDIM in data form and in noise form is one map; the canonical hash must not tell them apart, while a
    # stochastic or higher-order step keeps its prediction type.
    import torch

    from s3search import grids, processes
    from s3search.integrator import sample

    proc = processes.get("edm")
    ts = grids.logsnr(proc, 4)

    def sched(**kw):
        return SolverSchedule(process="edm", timesteps=ts, steps=tuple(StepSpec(**kw) for _ in range(4)))

    data, noise = sched(prediction="data"), sched(prediction="noise")
    assert data.canonical_hash() == noise.canonical_hash()
    assert sched(prediction="data", eta=0.5).canonical_hash() != sched(prediction="noise", eta=0.5).canonical_hash()
    denoiser = lambda x, t: 0.5 * x / (1.0 + t * t) ** 0.5  # noqa: E731 - any smooth data predictor
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    assert torch.allclose(sample(denoiser, x, data), sample(denoiser, x, noise), rtol=1e-10, atol=1e-12)
