"""Flow-matching models (SD3, FLUX, Wan) against diffusers: the shifted grids equal its schedulers' sigmas, and
Euler, Heun, DPM-Solver++ and UniPC as its flow schedulers run them equal our baselines on the same inputs.

The denoiser is exact for Gaussian data N(MU, diag S2) under x_t = (1 - t) x0 + t eps, written with alpha = 1 - t
so that it is defined at t = 1 too (where E[x0 | x_1] = MU); diffusers is handed the velocity v = (x - D) / t it
expects (flow_prediction), at each step's own sigma. diffusers keeps sigmas in float32, and its FlowMatch
schedulers and DPMSolverMultistep also cast the sample to float32, so "the same inputs" means the same float32
sigmas and agreement is to float32 rounding (measured up to 1.3e-6 over 28 steps; asserted at 5e-6). UniPC
computes in its sigmas' dtype: given them in float64 it agrees to 1e-14.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)

from s3search import baselines, grids, processes, sample  # noqa: E402
from s3search.processes import FLOW_T_TOP  # noqa: E402
from s3search.schedule import SolverSchedule, StepSpec  # noqa: E402
from s3search.search.baselines_seed import SEED_GRIDS, on_grids, seed_grids  # noqa: E402

from gaussian_bed import MU, S2, exact_ode  # noqa: E402

FLOW = processes.get("flow")
SAME_INPUTS_TOL = 5e-6


def D(x: torch.Tensor, t: float) -> torch.Tensor:
    a, s = 1.0 - t, t
    return MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)


D.data_mean = MU  # type: ignore[attr-defined]


def x_T() -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_diffusers(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The pipeline loop: model called once per entry of `timesteps`, at the sigma of that entry."""
    x = x.clone()
    for i, k in enumerate(scheduler.timesteps):
        s = float(scheduler.sigmas[i])
        x = scheduler.step((x - D(x, s)) / s, k, x).prev_sample
    return x


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def flux_calculate_shift():
    """diffusers' own calculate_shift, compiled from pipeline_flux.py's source: importing the pipeline module
    imports transformers (about 17 s), which the function does not use."""
    path = Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
    source = path.read_text()
    # The pipeline's own sigmas before the shift; flow-dynamic's native ends assume this line.
    assert "np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)" in source
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    namespace: dict = {}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_shift"]


# ----- the process at the pure-noise end ------------------------------------------------------------------
def test_flow_time_range_reaches_t_top_and_rejects_pure_noise():
    assert FLOW.t_max == 0.999 and FLOW.t_top == FLOW_T_TOP == 1.0 - 1e-6
    assert math.isfinite(FLOW.lambda_(FLOW.t_top))
    assert FLOW.t_of_lambda(FLOW.lambda_(FLOW.t_top)) == pytest.approx(FLOW.t_top, abs=1e-15)
    FLOW.check_time(FLOW.t_top, "t")
    with pytest.raises(ValueError, match="pure noise"):
        FLOW.check_time(1.0, "timesteps[0]")
    with pytest.raises(ValueError, match=r"timesteps\[0\]=1.0.*from_flow_sigmas"):
        baselines.get("ddim", [1.0, 0.5, 0.1], "flow")
    # Other processes keep t_top = t_max.
    for name in ("edm", "vp-linear", "vp-discrete"):
        assert processes.get(name).t_top == processes.get(name).t_max


def test_from_flow_sigmas_maps_a_pipeline_schedule():
    assert grids.from_flow_sigmas([1.0, 0.6, 0.2, 0.0]) == (FLOW_T_TOP, 0.6, 0.2)
    assert grids.from_flow_sigmas(torch.tensor([0.9, 0.3])) == pytest.approx((0.9, 0.3))
    for bad, field in (([1.2, 0.5], "sigmas"), ([0.5, 0.5, 0.0], "not below"), ([0.5, 0.0, 0.2], "sigmas"),
                       ([0.5, 0.0], "at least 2")):
        with pytest.raises(ValueError, match=field):
            grids.from_flow_sigmas(bad)
    with pytest.raises(ValueError, match="process="):
        grids.from_flow_sigmas([0.9, 0.3], process="edm")


# ----- grids against diffusers ----------------------------------------------------------------------------
def _sigmas(scheduler) -> np.ndarray:
    sig = torch.unique_consecutive(scheduler.sigmas).double().numpy()   # Heun repeats each inner sigma
    assert sig[-1] == 0.0
    return sig[:-1]


def _assert_pipeline_grid(ours, ref: np.ndarray) -> None:
    ours = np.asarray(ours)
    assert len(ours) == len(ref)
    if ref[0] == 1.0:   # pure noise: stood for by t_top
        assert ours[0] == FLOW_T_TOP
        ours, ref = ours[1:], ref[1:]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)   # float32 rounding of diffusers' sigmas


@pytest.mark.parametrize("m", [2, 4, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_static_shift_grids_equal_diffusers_sigmas(m, shift):
    # m = num_inference_steps: m sigmas before diffusers' final 0, our n = m - 1 steps then the final denoise.
    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(m)
    heun = FlowMatchHeunDiscreteScheduler(shift=shift)
    heun.set_timesteps(m)
    ours = grids.get("flow-shift", "flow", m - 1, shift=shift)
    _assert_pipeline_grid(ours, _sigmas(euler))
    _assert_pipeline_grid(ours, _sigmas(heun))
    kw = dict(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    dpm = DPMSolverMultistepScheduler(**kw)
    dpm.set_timesteps(m)
    _assert_pipeline_grid(grids.get("flow-dpm", "flow", m - 1, shift=shift), _sigmas(dpm))
    unipc = UniPCMultistepScheduler(**kw)
    unipc.set_timesteps(m)
    # UniPC moves its first sigma 1 to 1 - 1e-6 itself: the same point as our t_top.
    np.testing.assert_allclose(grids.get("flow-unipc", "flow", m - 1, shift=shift), _sigmas(unipc), rtol=0,
                               atol=1e-7)


@pytest.mark.parametrize("m", [4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6000])
def test_dynamic_shift_grid_equals_the_flux_pipeline(m, image_seq_len):
    calculate_shift = flux_calculate_shift()
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert grids.flux_mu(image_seq_len) == pytest.approx(mu, rel=1e-14)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / m, m), mu=mu)   # as FluxPipeline.__call__
    ref = _sigmas(sch)
    _assert_pipeline_grid(grids.get("flow-dynamic", "flow", m - 1, image_seq_len=image_seq_len), ref)
    _assert_pipeline_grid(grids.get("flow-dynamic", "flow", m - 1, mu=mu), ref)
    # Multistep schedulers with dynamic shifting set flow_shift = e^mu.
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, use_dynamic_shifting=True,
                                      prediction_type="flow_prediction")
    dpm.set_timesteps(m, mu=mu)
    _assert_pipeline_grid(grids.get("flow-dpm", "flow", m - 1, shift=math.exp(mu)), _sigmas(dpm))


def test_shifted_grid_on_a_range_is_uniform_in_the_unshifted_sigma():
    for shift in (0.5, 3.0):
        ts = grids.get("flow-shift", "flow", 7, t_start=0.95, t_end=0.01, shift=shift)
        assert ts[0] == 0.95 and ts[-1] == 0.01
        u = np.array([t / (shift - (shift - 1) * t) for t in ts])
        np.testing.assert_allclose(np.diff(u), np.full(7, (u[-1] - u[0]) / 7), rtol=1e-12)
    # On the search's range every static kind is the same grid, and flow_shift(u, 1) is time-uniform.
    kinds = [grids.get(k, "flow", 6, t_start=0.999, t_end=0.001) for k in ("flow-shift", "flow-dpm", "flow-unipc")]
    assert kinds[0] == kinds[1] == kinds[2]
    np.testing.assert_allclose(grids.get("flow-shift", "flow", 6, t_start=0.999, t_end=0.001, shift=1.0),
                               grids.time_uniform(FLOW, 6), rtol=1e-14)
    assert grids.flow_unshift(grids.flow_shift(0.3, 3.0), 3.0) == pytest.approx(0.3, rel=1e-15)


def test_flow_grids_elsewhere_keep_the_noise_levels():
    edm = processes.get("edm")
    ts = grids.get("flow-shift", edm, 5, t_start=14.0, t_end=0.05)
    on_flow = grids.get("flow-shift", "flow", 5, t_start=14.0 / 15.0, t_end=0.05 / 1.05)
    np.testing.assert_allclose([t / (1 + t) for t in ts], on_flow, rtol=1e-12)   # sigma_VE -> flow sigma


@pytest.mark.parametrize("kwargs,field", [
    (dict(shift=0.0), "shift="), (dict(shift=float("inf")), "shift="), (dict(rho=7.0), "params.rho"),
    (dict(shift=0.5), "t_end="),   # the pipeline's last sigma falls below t_min
    (dict(t_start=1.0), "pure noise"), (dict(t_start=0.2, t_end=0.5), "t_end="),
])
def test_flow_grid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        grids.get("flow-shift", "flow", 4, **kwargs)


def test_flow_dynamic_arguments():
    with pytest.raises(ValueError, match="not both"):
        grids.get("flow-dynamic", "flow", 4, mu=1.0, image_seq_len=1024)
    with pytest.raises(ValueError, match="image_seq_len="):
        grids.get("flow-dynamic", "flow", 4, image_seq_len=-1)
    with pytest.raises(ValueError, match="mu="):
        grids.get("flow-dynamic", "flow", 4, mu=float("nan"))
    assert grids.get("flow-dynamic", "flow", 4) == grids.get("flow-dynamic", "flow", 4, mu=1.15)


# ----- the exponential integrator at the flow process -----------------------------------------------------
def test_ddim_step_on_flow_is_the_euler_step():
    # lambda = log((1 - t) / t): sigma_t / sigma_s = t / s and alpha_t (1 - e^-h) = 1 - t / s, so one
    # first-order data step is x + (t - s) v with v = (x - D) / s, which is FlowMatchEuler's step.
    x = x_T()
    for s, t in ((FLOW_T_TOP, 0.7), (0.7, 0.2), (0.2, 0.001)):
        one = SolverSchedule(process="flow", timesteps=(s, t), steps=(StepSpec(),), final="none")
        torch.testing.assert_close(sample(D, x, one), x + (t - s) * (x - D(x, s)) / s, rtol=1e-14, atol=1e-14)
    # The final denoise is diffusers' last step, to sigma 0: x + (0 - s) v = D(x, s).
    torch.testing.assert_close(x - 0.3 * (x - D(x, 0.3)) / 0.3, D(x, 0.3), rtol=1e-14, atol=1e-14)


# ----- baselines against diffusers' flow schedulers -------------------------------------------------------
@pytest.mark.parametrize("m", [4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_on_the_same_sigmas(m, shift):
    # Custom sigmas at shift 1 reach the scheduler unchanged: diffusers runs our grid, first point t_top.
    ts = grids.get("flow-shift", "flow", m - 1, shift=shift)
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=list(ts))
    same = grids.from_flow_sigmas(euler.sigmas)
    assert max_diff(torch.tensor(same), torch.tensor(ts)) < 1e-7
    assert max_diff(sample(D, x_T(), baselines.get("ddim", same, "flow")), run_diffusers(euler, x_T())) \
        < SAME_INPUTS_TOL
    heun = FlowMatchHeunDiscreteScheduler(shift=shift)
    heun.set_timesteps(m)
    # FlowMatchHeun takes no custom sigmas: its first sigma 1 is replaced by t_top in place.
    heun.sigmas[0] = FLOW_T_TOP
    same = grids.from_flow_sigmas(torch.unique_consecutive(heun.sigmas))
    assert max_diff(sample(D, x_T(), baselines.get("flow_heun", same, "flow")), run_diffusers(heun, x_T())) \
        < SAME_INPUTS_TOL


@pytest.mark.parametrize("m", [4, 28])
def test_pipeline_defaults_from_sigma_one(m):
    # diffusers' own defaults start at sigma 1, ours at t_top = 1 - 1e-6: the first step differs by
    # 1e-6 (x - D) / t, measured at most 4.1e-6 in the output.
    for make, name in ((FlowMatchEulerDiscreteScheduler, "ddim"), (FlowMatchHeunDiscreteScheduler, "flow_heun")):
        sch = make(shift=3.0)
        sch.set_timesteps(m)
        sched = baselines.get(name, grids.get("flow-shift", "flow", m - 1, shift=3.0), "flow")
        assert sched.nfe == len(sch.timesteps)
        assert max_diff(sample(D, x_T(), sched), run_diffusers(sch, x_T())) < 1e-5


@pytest.mark.parametrize("m", [4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_with_flow_sigmas(m, shift, order):
    # diffusers' update uses the float sigma, but hands the network int(sigma * 1000); here the model is
    # called at the sigma itself, as the integrator does.
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                      algorithm_type="dpmsolver++", solver_order=order)
    sch.set_timesteps(m)
    ts = grids.from_flow_sigmas(sch.sigmas)
    name, params = ("dpmpp_2m", {}) if order == 2 else ("dpmpp_3m", {"warmup": "dpmpp", "lower_order_final": True})
    sched = baselines.get(name, ts, "flow", **params)
    assert sched.nfe == m
    assert max_diff(sample(D, x_T(), sched), run_diffusers(sch, x_T())) < SAME_INPUTS_TOL


@pytest.mark.parametrize("m", [4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("variant,order", [("bh2", 2), ("bh2", 3), ("bh1", 2)])
def test_unipc_with_flow_sigmas(m, shift, variant, order):
    sch = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                  solver_order=order, solver_type=variant)
    sch.set_timesteps(m)
    ts = grids.from_flow_sigmas(sch.sigmas)
    # UniPC computes in its sigmas' dtype (not float32 throughout, as the others): in float64 it is exact.
    sch.sigmas = sch.sigmas.double()
    ours = sample(D, x_T(), baselines.get(f"unipc_{variant}_{order}", ts, "flow"))
    if variant == "bh2":
        ref = run_diffusers(sch, x_T())
    else:
        # bh1 is NaN on the step to sigma 0 (B(h) = h is infinite); that step returns D at the predicted point.
        x = x_T()
        for i, k in enumerate(sch.timesteps[:-1]):
            s = float(sch.sigmas[i])
            x = sch.step((x - D(x, s)) / s, k, x).prev_sample
        ref = D(x, ts[-1])
    assert max_diff(ours, ref) < 1e-12


# ----- flow Heun --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process,t0,t1", [("flow", 0.98, 0.02), ("edm", 10.0, 0.1)])
def test_flow_heun_is_second_order(process, t0, t1):
    from gaussian_bed import denoiser

    den = denoiser(process)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3.0
    ref = den(exact_ode(x, process, t0, t1), t1)
    ns = (24, 32, 48, 64)
    errors = [(sample(den, x, baselines.get("flow_heun", grids.logsnr(processes.get(process), n, t0, t1), process))
               - ref).norm().item() for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.3, slope


def test_flow_heun_is_not_edm_heun():
    ts = grids.logsnr(FLOW, 4)
    a = sample(D, x_T(), baselines.get("flow_heun", ts, "flow"))
    b = sample(D, x_T(), baselines.get("edm_heun", ts, "flow"))
    assert max_diff(a, b) > 1e-3   # the trapezoidal rule in flow time vs in the VE noise level


# ----- seeding ----------------------------------------------------------------------------------------------
def test_seed_grids_add_the_flow_grid_on_flow_only():
    assert seed_grids("edm") == SEED_GRIDS and seed_grids("vp-discrete") == SEED_GRIDS
    assert seed_grids("flow") == SEED_GRIDS + ("flow-shift",)
    (cand,) = on_grids(["ddim"], 5, "flow", grid_names=("flow-shift",), t_start=0.999, t_end=0.001)
    assert cand.label == "ddim@flow-shift" and cand.schedule.timesteps == \
        grids.get("flow-shift", "flow", 4, t_start=0.999, t_end=0.001)
