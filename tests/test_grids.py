"""Timestep grids: shape and range on every process, exact formulas, and maintained references (k-diffusion,
diffusers' published AYS tables and timesteps)."""

from __future__ import annotations


import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s3search import grids, processes
from reference_libs import k_diffusion_sampling

PROCESSES = ["edm", "vp-linear", "vp-cosine", "vp-discrete", "flow"]


def _sigmas(proc, ts):
    return np.array([proc.sigma_ve(t) for t in ts])


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("name", [g for g in grids.names() if g != "ays-svd"])
@pytest.mark.parametrize("n", [1, 3, 10, 40])
def test_every_grid_is_decreasing_inside_the_range(name, process, n):
    proc = processes.get(process)
    ts = grids.get(name, proc, n)
    assert len(ts) == n + 1
    assert all(isinstance(t, float) for t in ts)
    assert all(ts[i + 1] < ts[i] for i in range(n))
    assert all(proc.t_min <= t <= proc.t_top for t in ts)
    # AYS keeps its own noise levels unless told a range; so do the flow pipeline grids on flow (test_flow.py).
    own_levels = name.startswith("ays-") or (name in grids.FLOW_PIPELINE_GRIDS and process == "flow")
    if not own_levels:
        assert ts[0] == proc.t_max and ts[-1] == proc.t_min


@pytest.mark.parametrize("process", PROCESSES)
def test_explicit_range_is_respected(process):
    proc = processes.get(process)
    start = proc.t_min + 0.7 * (proc.t_max - proc.t_min)
    end = proc.t_min + 0.1 * (proc.t_max - proc.t_min)
    for name in grids.names():
        ts = grids.get(name, proc, 6, t_start=start, t_end=end)
        assert ts[0] == start and ts[-1] == end


def test_time_uniform_and_quadratic_formulas():
    proc = processes.get("vp-linear")
    np.testing.assert_allclose(grids.time_uniform(proc, 4), [1.0, 0.75025, 0.5005, 0.25075, 0.001], rtol=1e-15)
    q = np.sqrt(grids.quadratic(proc, 5))
    np.testing.assert_allclose(np.diff(q), np.full(5, (math.sqrt(1e-3) - 1.0) / 5), rtol=1e-12)


@pytest.mark.parametrize("process", PROCESSES)
def test_logsnr_is_uniform_in_lambda(process):
    proc = processes.get(process)
    lams = np.array([proc.lambda_(t) for t in grids.logsnr(proc, 8)])
    # vp-discrete interpolates log alpha piecewise-linearly, so its lambda round trip is exact only to ~1e-9.
    np.testing.assert_allclose(np.diff(lams), np.full(8, (lams[-1] - lams[0]) / 8), rtol=1e-6)


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_edm_matches_k_diffusion_karras(rho):
    sampling = k_diffusion_sampling()
    proc = processes.get("edm")
    # k-diffusion builds its ramp in torch's default dtype; float64 makes it a reference to 1e-12.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = sampling.get_sigmas_karras(11, proc.t_min, proc.t_max, rho, device="cpu").numpy()[:-1]
    finally:
        torch.set_default_dtype(old)
    np.testing.assert_allclose(grids.get("edm", proc, 10, rho=rho), ref, rtol=1e-10)


@pytest.mark.parametrize("process", ["vp-linear", "vp-cosine", "flow"])
def test_edm_on_other_processes_is_the_same_noise_levels(process):
    proc = processes.get(process)
    sig = _sigmas(proc, grids.edm(proc, 7))
    s_max, s_min = sig[0], sig[-1]
    u = np.linspace(0, 1, 8)
    ref = (s_max ** (1 / 7) + u * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, ref, rtol=1e-9)


def test_kl_optimal_is_uniform_in_angle():
    proc = processes.get("edm")
    for c in (0.5, 1.0, 3.0):
        theta = np.arctan(_sigmas(proc, grids.kl_optimal(proc, 9, c=c)) / c)
        np.testing.assert_allclose(np.diff(theta), np.full(9, (theta[-1] - theta[0]) / 9), rtol=1e-12)


def _diffusers_ays():
    from diffusers.schedulers.scheduling_utils import AysSchedules
    return AysSchedules


@pytest.mark.parametrize("table,key", [("sd15", "StableDiffusion"), ("sdxl", "StableDiffusionXL"),
                                       ("svd", "StableDiffusionVideo")])
def test_tables_match_diffusers(table, key):
    ref = _diffusers_ays()[f"{key}Sigmas"]
    # diffusers sets the final value to 0.0 (its last step goes to sigma = 0); we keep the paper's sigma_min.
    assert grids.AYS_TABLES[table][:-1] == tuple(ref[:-1]) and ref[-1] == 0.0
    assert grids.ays_sigmas(table, 10) == grids.AYS_TABLES[table]


@pytest.mark.parametrize("table,key", [("sd15", "StableDiffusion"), ("sdxl", "StableDiffusionXL")])
def test_sd_tables_map_to_diffusers_timesteps(table, key):
    """On SD's own discrete process the published sigmas land on diffusers' published integer timesteps."""
    proc = grids.ays_native_process(table)
    steps = [proc.model_time(t) for t in grids.ays(table, 10, proc)]
    ref = _diffusers_ays()[f"{key}Timesteps"]
    np.testing.assert_allclose(steps[:-1], ref, atol=0.7)  # the table is rounded to 3-4 significant digits
    assert abs(steps[-1]) < 1e-9  # sigma_min = 0.029 is SD's first discrete step (0.0292 before rounding)


def test_loglinear_interpolation():
    table = grids.AYS_TABLES["sdxl"]
    s20 = grids.ays_sigmas("sdxl", 20)
    assert len(s20) == 21
    assert s20[::2] == pytest.approx(table, rel=1e-12)  # positions j/20 with j even are the table's i/10
    np.testing.assert_allclose(s20[1::2], np.sqrt(np.array(table[:-1]) * np.array(table[1:])), rtol=1e-12)
    s7 = np.log(grids.ays_sigmas("sdxl", 7))
    x = np.linspace(0, 1, 8) * 10
    i = np.floor(x[1:-1]).astype(int)
    ref = np.log(table)[i] + (x[1:-1] - i) * (np.log(table)[i + 1] - np.log(table)[i])
    np.testing.assert_allclose(s7[1:-1], ref, rtol=1e-12)


def test_ays_out_of_range_needs_a_range_then_stretches_in_log_sigma():
    proc = processes.get("edm")
    with pytest.raises(ValueError, match="table='svd'"):
        grids.get("ays-svd", proc, 10)
    ts = grids.get("ays-svd", proc, 10, t_start=80.0)
    assert ts[0] == 80.0 and ts[-1] == proc.t_min
    table = np.log(grids.AYS_TABLES["svd"])
    u_table = (table - table[-1]) / (table[0] - table[-1])
    u = (np.log(ts) - math.log(ts[-1])) / (math.log(ts[0]) - math.log(ts[-1]))
    np.testing.assert_allclose(u, u_table, atol=1e-12)
    native = grids.ays("svd", 10, grids.ays_native_process("svd"))
    np.testing.assert_allclose(native, grids.AYS_TABLES["svd"], rtol=1e-12)


@pytest.mark.parametrize("process", PROCESSES)
def test_ays_keeps_noise_levels_across_processes(process):
    proc = processes.get(process)
    sig = _sigmas(proc, grids.ays("sdxl", 10, proc))
    ref = np.clip(grids.AYS_TABLES["sdxl"], proc.sigma_ve(proc.t_min), proc.sigma_ve(proc.t_max))
    np.testing.assert_allclose(sig, ref, rtol=2e-6)  # vp-discrete's interpolated lambda inverse


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="nope", process="edm", n=3), "grid="),
    (dict(name="edm", process="edm", n=0), "n="),
    (dict(name="edm", process="edm", n=2.5), "n="),
    (dict(name="edm", process="edm", n=True), "n="),
    (dict(name="edm", process="edm", n=3, rho=-1.0), "rho="),
    (dict(name="edm", process="edm", n=3, rho=float("nan")), "rho="),
    (dict(name="kl-optimal", process="edm", n=3, c=0.0), "c="),
    (dict(name="logsnr", process="edm", n=3, rho=7.0), "params.rho"),
    (dict(name="edm", process="edm", n=3, t_start=100.0), "t_start="),
    (dict(name="edm", process="edm", n=3, t_end=0.0), "t_end="),
    (dict(name="edm", process="edm", n=3, t_start=1.0, t_end=2.0), "t_end="),
    (dict(name="edm", process="nope", n=3), "process="),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        grids.get(kwargs.pop("name"), kwargs.pop("process"), kwargs.pop("n"), **kwargs)


def test_a_grid_that_is_not_decreasing_is_rejected():
    with pytest.raises(ValueError, match="not below"):
        grids.from_sigmas(processes.get("vp-linear"), [10.0, 1.0, 1.0, 0.5])


def test_loglinear_interp_rejects_bad_tables():
    with pytest.raises(ValueError, match="decreasing"):
        grids.loglinear_interp([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="positive"):
        grids.loglinear_interp([1.0, 0.0], 3)
    with pytest.raises(ValueError, match="table="):
        grids.ays_sigmas("sd3", 10)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["time-uniform", "quadratic", "logsnr", "edm", "kl-optimal", "flow-shift"]),
       process=st.sampled_from(PROCESSES), n=st.integers(1, 60),
       a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_property_any_range_gives_a_valid_schedule_grid(name, process, n, a, b):
    from s3search.schedule import SolverSchedule, StepSpec

    proc = processes.get(process)
    lo, hi = sorted((a, b))
    if hi - lo < 0.05:
        return
    start = proc.t_min + hi * (proc.t_max - proc.t_min)
    end = proc.t_min + lo * (proc.t_max - proc.t_min)
    ts = grids.get(name, proc, n, t_start=start, t_end=end)
    SolverSchedule(process=process, timesteps=ts, steps=tuple(StepSpec() for _ in range(n)))
