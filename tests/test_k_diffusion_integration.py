"""sample_schedule (k-diffusion calling convention) against `sample`, and against k-diffusion's own samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s3search import baselines, grids
from s3search.exports import k_diffusion_sigmas
from s3search.integrations.k_diffusion import retime, sample_schedule
from s3search.integrator import sample
from s3search.processes import get as get_process
from s3search.schedule import SolverSchedule, StepSpec
from reference_libs import k_diffusion_sampling

# A two-component isotropic Gaussian mixture in VE form: an exact, nonlinear denoiser.
MEANS = torch.tensor([[1.5, -0.5, 0.25], [-1.0, 0.75, -0.5]], dtype=torch.float64)
VARS = torch.tensor([0.09, 0.25], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)


def denoise_ve(y: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    s2 = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1, 1, 1) ** 2 if torch.is_tensor(sigma) else sigma**2
    c = VARS.reshape(1, 2, 1) + s2                                  # [B or 1, K, 1]
    diff = y[:, None, :] - MEANS[None]                               # [B, K, d]
    logp = torch.log(WEIGHTS)[None] - 0.5 * (diff**2 / c).sum(-1) - 0.5 * MEANS.shape[1] * torch.log(c[..., 0])
    r = torch.softmax(logp, dim=1)[..., None]
    post = MEANS[None] + VARS.reshape(1, 2, 1) / c * diff
    return (r * post).sum(1)


def kd_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion convention: sigma is a tensor of shape [batch]."""
    assert sigma.shape == (x.shape[0],)
    return denoise_ve(x, sigma)


def our_denoiser(process: str):
    proc = get_process(process)

    def D(x: torch.Tensor, t: float) -> torch.Tensor:
        a, s = proc.alpha(t), proc.sigma(t)
        return denoise_ve(x / a, s / a)
    return D


def _x(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MIXED_STEPS = (StepSpec(order=1), StepSpec(order=2, derivative="bh2", corrector="unic"),
               StepSpec(order=3, derivative="taylor", corrector="implicit"), StepSpec(order=2, derivative="dpmpp"),
               StepSpec(order=2, prediction="noise"), StepSpec(order=1))


def test_matches_sample_bitwise_on_edm():
    ts = grids.edm(get_process("edm"), 6)
    sched = SolverSchedule("edm", tuple(ts), MIXED_STEPS)
    x = _x() * ts[0]
    ours = sample_schedule(kd_model, x, k_diffusion_sigmas(sched, ), sched)
    ref = sample(our_denoiser("edm"), x, sched)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("process", ["vp-linear", "vp-discrete", "vp-cosine"])
def test_matches_sample_on_vp_processes(process):
    proc = get_process(process)
    ts = grids.logsnr(proc, 6)
    sched = SolverSchedule(process, tuple(ts), MIXED_STEPS)
    x_ve = _x() * proc.sigma_ve(ts[0])
    ours = sample_schedule(kd_model, x_ve, k_diffusion_sigmas(sched), sched)
    # sample works on x_vp = alpha x_ve; the result (denoised data) is the same up to rounding of the scaling.
    ref = sample(our_denoiser(process), x_ve * proc.alpha(ts[0]), sched)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_stochastic_schedule_uses_the_generator():
    ts = grids.edm(get_process("edm"), 5)
    sched = SolverSchedule("edm", tuple(ts), (StepSpec(order=1, eta=1.0),) + (StepSpec(order=2, eta=0.5),) * 4)
    x = _x() * ts[0]
    a = sample_schedule(kd_model, x, k_diffusion_sigmas(sched), sched, generator=torch.Generator().manual_seed(4))
    b = sample(our_denoiser("edm"), x, sched, generator=torch.Generator().manual_seed(4))
    c = sample_schedule(kd_model, x, k_diffusion_sigmas(sched), sched, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name,kd_fn", [("ddim", "sample_euler"), ("dpmpp_2m", "sample_dpmpp_2m"),
                                        ("dpmpp_3m", "sample_dpmpp_3m_sde")])
def test_baselines_agree_with_k_diffusion_samplers(name, kd_fn):
    ks = k_diffusion_sampling()
    ts = grids.edm(get_process("edm"), 8)
    sched = baselines.get(name, timesteps=ts, process="edm")
    sigmas = torch.tensor(list(ts) + [0.0], dtype=torch.float64)
    x = _x() * ts[0]
    kwargs = {"eta": 0.0} if "sde" in kd_fn else {}
    ref = getattr(ks, kd_fn)(kd_model, x.clone(), sigmas, disable=True, **kwargs)
    ours = sample_schedule(kd_model, x, sigmas, sched)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_other_sigmas_retime_the_schedule():
    proc = get_process("edm")
    ts = grids.edm(proc, 5)
    sched = baselines.get("dpmpp_2m", timesteps=ts, process="edm")
    other = grids.logsnr(proc, 5)
    sigmas = torch.tensor(list(other) + [0.0], dtype=torch.float64)
    moved = retime(sched, sigmas)
    assert moved.timesteps == pytest.approx(other, rel=1e-12)
    assert moved.steps == sched.steps
    x = _x() * other[0]
    torch.testing.assert_close(sample_schedule(kd_model, x, sigmas, sched), sample(our_denoiser("edm"), x, moved))
    # The float32 export of the schedule's own grid keeps the exact times.
    assert retime(sched, k_diffusion_sigmas(sched)) is sched


def test_callback_sees_every_evaluation():
    ts = grids.edm(get_process("edm"), 4)
    sched = SolverSchedule("edm", tuple(ts), (StepSpec(order=1), StepSpec(order=2, derivative="bh1", corrector="unic"),
                                              StepSpec(order=2), StepSpec(order=1)))
    seen = []
    sample_schedule(kd_model, _x() * ts[0], k_diffusion_sigmas(sched), sched, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(sched.nfe))
    assert all({"x", "sigma", "denoised"} <= set(d) for d in seen)


def test_extra_args_reach_the_model():
    ts = grids.edm(get_process("edm"), 3)
    sched = baselines.get("ddim", timesteps=ts, process="edm")
    got = []

    def model(x, sigma, cond=None):
        got.append(cond)
        return denoise_ve(x, sigma)
    sample_schedule(model, _x() * ts[0], k_diffusion_sigmas(sched), sched, extra_args={"cond": "c"})
    assert got == ["c"] * sched.nfe


def test_final_none_returns_ve_state():
    proc = get_process("vp-linear")
    ts = grids.logsnr(proc, 4)
    sched = SolverSchedule("vp-linear", tuple(ts), (StepSpec(order=1),) * 4, final="none")
    sig = k_diffusion_sigmas(sched)
    assert len(sig) == len(ts) and float(sig[-1]) > 0
    x_ve = _x() * proc.sigma_ve(ts[0])
    out = sample_schedule(kd_model, x_ve, sig, sched)
    ref = sample(our_denoiser("vp-linear"), x_ve * proc.alpha(ts[0]), sched) / proc.alpha(ts[-1])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigmas,match", [([80.0, 10.0, 1.0], "ending in 0.0"),
                                          ([80.0, 10.0, 0.0], "values ending"),
                                          ([80.0, -1.0, 1.0, 0.0], "positive"),
                                          ([1e6, 10.0, 1.0, 0.0], "process")])
def test_bad_sigmas_raise(sigmas, match):
    sched = baselines.get("ddim", timesteps=(80.0, 10.0, 1.0), process="edm")
    with pytest.raises(ValueError, match=match):
        sample_schedule(kd_model, _x(), torch.tensor(sigmas, dtype=torch.float64), sched)


def test_named_schedule_runs():
    from s3search.named import NamedSchedule

    ts = grids.edm(get_process("edm"), 4)
    sched = NamedSchedule(sampler="ipndm", process="edm", timesteps=tuple(ts))
    x = _x() * ts[0]
    out = sample_schedule(kd_model, x, k_diffusion_sigmas(sched), sched)
    assert torch.equal(out, sample(our_denoiser("edm"), x, sched))
    assert math.isfinite(float(out.abs().max()))
    assert np.isfinite(out.numpy()).all()
