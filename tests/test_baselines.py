"""The baselines registry: every published sampler by name, on any grid, as a schedule or a named sampler."""

from __future__ import annotations

import json

import pytest
import torch

from s3search import SolverSchedule, baselines, grids, processes, sample
from s3search.named import NamedSchedule

from gaussian_bed import denoiser, exact_ode

REQUIRED = {"ddim", "ddim_eta1", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "unipc_bh1_2",
            "unipc_bh1_3", "unipc_bh2_2", "unipc_bh2_3", "deis", "ipndm", "seeds_1", "seeds_2", "seeds_3",
            "er_sde_1", "er_sde_2", "er_sde_3", "sa_solver", "edm_heun", "li_accelerated_ode",
            "li_accelerated_ddpm", "flow_heun"}
SCHEDULE_SPACE = {"ddim", "ddim_eta1", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
                  "unipc_bh1_2", "unipc_bh1_3", "unipc_bh2_2", "unipc_bh2_3", "sa_solver", "seeds_1", "flow_heun"}


def test_names_cover_the_issue():
    assert REQUIRED <= set(baselines.names())
    for entry in baselines.describe():
        assert entry["description"] and entry["paper"]
        assert entry["kind"] == ("schedule" if entry["name"] in SCHEDULE_SPACE else "named")
    json.dumps(baselines.describe())


@pytest.mark.parametrize("name", baselines.names())
@pytest.mark.parametrize("process", ["edm", "vp-linear", "vp-discrete", "vp-cosine", "flow"])
def test_every_baseline_runs_on_every_process(name, process):
    proc = processes.get(process)
    ts = grids.logsnr(proc, 5)
    s = baselines.get(name, ts, process)
    assert isinstance(s, SolverSchedule if name in SCHEDULE_SPACE else NamedSchedule)
    assert s.name == name and s.timesteps == tuple(ts)
    calls: list[float] = []
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(denoiser(process, calls), x, s, generator=torch.Generator().manual_seed(0))
    assert len(calls) == s.nfe and torch.isfinite(out).all()
    assert type(s).from_json(s.to_json()) == s


def _deterministic(name: str) -> bool:
    s = baselines.get(name, (10.0, 1.0, 0.1), "edm")
    return not (getattr(s, "stochastic", False) or any(st.eta > 0 for st in getattr(s, "steps", ())))


@pytest.mark.parametrize("name", [n for n in baselines.names() if _deterministic(n)])
def test_baselines_approach_the_exact_answer(name):
    # Deterministic baselines converge to D(exact ODE solution); stochastic ones are checked in distribution
    # in test_order_named. Here: at 64 steps every ODE baseline is within 2% of the answer.
    process = "edm"
    proc = processes.get(process)
    s = baselines.get(name, grids.logsnr(proc, 64, 10.0, 0.1), process)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    D = denoiser(process)
    ref = D(exact_ode(x, process, 10.0, 0.1), 0.1)
    err = (sample(D, x, s) - ref).norm() / ref.norm()
    assert err < 2e-2, err


def test_schedule_space_mappings():
    ts = grids.logsnr(processes.get("edm"), 6)
    s = baselines.get("dpmpp_3m", ts, "edm")
    assert [(st.order, st.derivative) for st in s.steps] == [(1, "taylor"), (2, "taylor")] + [(3, "dpmpp")] * 4
    d = baselines.get("dpmpp_3m", ts, "edm", warmup="dpmpp", lower_order_final=True)
    assert [(st.order, st.derivative) for st in d.steps][1:] == [(2, "dpmpp")] + [(3, "dpmpp")] * 3 + [(2, "dpmpp")]
    u = baselines.get("unipc_bh2_3", ts, "edm")
    assert [st.order for st in u.steps] == [1, 2, 3, 3, 3, 2]
    assert [st.corrector for st in u.steps] == ["unic"] * 5 + ["none"]
    assert [st.eta for st in baselines.get("dpmpp_2m_sde", ts, "edm", eta=0.5).steps] == [0.5] * 6
    assert {st.eta for st in baselines.get("sa_solver", ts, "edm", tau=0.5).steps} == {0.25}
    win = baselines.get("sa_solver", ts, "edm", tau_sigma_min=0.5, tau_sigma_max=5.0)
    svs = [processes.get("edm").sigma_ve(t) for t in ts[1:]]
    assert [st.eta for st in win.steps] == [1.0 if 0.5 <= sv <= 5.0 else 0.0 for sv in svs]
    # ER-SDE-1 with phi = sigma^(1 + eta) is the eta step; other phi run by name.
    assert [st.eta for st in baselines.get("er_sde_1", ts, "edm", phi=4).steps] == [0.5] * 6
    assert isinstance(baselines.get("er_sde_1", ts, "edm", phi=7), NamedSchedule)
    assert baselines.get("seeds_1", ts, "edm", form="noise").steps[0].prediction == "noise"


def test_er_sde_1_schedule_equals_named_sampler():
    # The eta-step mapping must reproduce the named ER-SDE-1 exactly when given the same noise.
    ts = grids.logsnr(processes.get("edm"), 6, 10.0, 0.1)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    for phi in (1, 2, 4, 5):
        a = sample(denoiser("edm"), x, baselines.get("er_sde_1", ts, "edm", phi=phi), torch.Generator().manual_seed(3))
        named = NamedSchedule(sampler="er_sde_1", process="edm", timesteps=tuple(ts), params={"phi": phi})
        b = sample(denoiser("edm"), x, named, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_seeds_1_schedule_equals_named_sampler():
    ts = grids.logsnr(processes.get("vp-linear"), 5, 0.9, 0.05)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for form in ("data", "noise"):
        a = sample(denoiser("vp-linear"), x, baselines.get("seeds_1", ts, "vp-linear", form=form),
                   torch.Generator().manual_seed(3))
        named = NamedSchedule(sampler="seeds_1", process="vp-linear", timesteps=tuple(ts), params={"form": form})
        b = sample(denoiser("vp-linear"), x, named, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, nfe, expected", [("dpmpp_2m", 6, 6), ("edm_heun", 7, 4), ("seeds_3", 7, 3),
                                                 ("seeds_3", 6, None), ("unipc_bh2_3", 5, 5)])
def test_num_timesteps_for(name, nfe, expected):
    assert baselines.num_timesteps_for(name, nfe, "edm") == expected
    if expected is None:
        with pytest.raises(ValueError, match="nfe"):
            baselines.for_nfe(name, nfe, "edm")
    else:
        assert baselines.for_nfe(name, nfe, "edm", grid="edm").nfe == nfe


@pytest.mark.parametrize("call, field", [
    (lambda: baselines.get("nope", [10.0, 1.0], "edm"), "baseline"),
    (lambda: baselines.get("dpmpp_2m", [10.0, 1.0], "edm", eta=1.0), "params.eta"),
    (lambda: baselines.get("dpmpp_2m_sde", [10.0, 1.0], "edm", eta=-1.0), "params.eta"),
    (lambda: baselines.get("unipc_bh1_2", [10.0, 1.0], "edm", lower_order_final="yes"), "params.lower_order_final"),
    (lambda: baselines.get("seeds_2", [10.0, 1.0], "edm", form="x"), "params.form"),
    (lambda: baselines.get("ddim", [1.0, 10.0], "edm"), r"timesteps\[1\]"),
    (lambda: baselines.get("ddim", "10,1", "edm"), "timesteps"),
    (lambda: baselines.get("ddim", [10.0, 1.0], "nope"), "process"),
    (lambda: baselines.num_timesteps_for("ddim", 0), "nfe"),
])
def test_invalid_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# ----- the `s3search baselines` command -------------------------------------------------------------------
class _RecordingEvaluator:
    def __init__(self):
        self.seen = []

    def evaluate(self, schedules, request):
        from s3search.evaluation.base import EvalResult

        self.seen.extend(schedules)
        return [EvalResult(s.canonical_hash(), float(s.nfe), s.nfe, 0.0) for s in schedules]


def test_baseline_table_hits_each_nfe_exactly():
    from s3search.cli.baselines_cmd import baseline_table

    ev = _RecordingEvaluator()
    table = baseline_table("gmm-8x8", [3, 4], evaluator=ev, n_samples=10)
    assert set(table) == set(baselines.names())
    assert all(s.nfe in (3, 4) for s in ev.seen)
    assert table["edm_heun"] == {3: 3.0, 4: None}      # 2M - 1 evaluations: odd budgets only
    assert table["dpmpp_2m"] == {3: 3.0, 4: 4.0}


def test_cli_lists_and_scores():
    from typer.testing import CliRunner

    from s3search.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["baselines", "--list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {e["name"] for e in json.loads(listed.output)} == set(baselines.names())
    out = runner.invoke(app, ["baselines", "--model", "gmm-8x8", "--nfe", "3,4", "--only", "ddim,edm_heun",
                              "--n-samples", "64", "--metric", "fd", "--json"])
    assert out.exit_code == 0, out.output
    table = json.loads(out.stdout)   # the progress bar goes to stderr
    assert table["edm_heun"]["4"] is None and table["edm_heun"]["3"] > 0 and table["ddim"]["4"] > 0
    bad = runner.invoke(app, ["baselines", "--model", "gmm-8x8", "--nfe", "x"])
    assert bad.exit_code != 0 and "nfe" in bad.output
