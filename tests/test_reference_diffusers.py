"""Agreement with diffusers' schedulers on the same inputs: the discrete VP process of Stable-Diffusion-era DDPM
models (`vp-discrete`, linear betas 1e-4 .. 0.02 over 1000 steps), the same exact Gaussian-mixture denoiser given
to diffusers as the epsilon it expects, the same x_T and timesteps, and for DDIM(eta=1) / SDE-DPM-Solver++ the same
noise (DDIM draws it from the generator passed to `step`, in the order our integrator does; DPMSolverMultistep
is handed the same draws through `variance_noise`).

Timesteps: diffusers' integer timestep k is our time t = (k + 1) / 1000 (VPDiscrete puts step k there). Its last
step goes to sigma = 0 (final_sigmas_type="zero", DDIM's final alpha = 1), which is our final denoise.
diffusers keeps alphas_cumprod in float32, so agreement is asserted at 1e-4 relative (measured ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from s3search import baselines, processes, sample  # noqa: E402
from s3search.models.mixtures import grid_mixture  # noqa: E402
from s3search.noise import randn_rows  # noqa: E402

PROCESS = "vp-discrete"
PROC = processes.get(PROCESS)
GM = grid_mixture(3, 2, spacing=1.0, std=(0.2, 0.3))
D = GM.denoiser(PROCESS)


def our_time(k) -> float:
    return (int(k) + 1) / 1000.0


def eps_model(x: torch.Tensor, k) -> torch.Tensor:
    t = our_time(k)
    return (x - PROC.alpha(t) * D(x, t)) / PROC.sigma(t)


def run_diffusers(scheduler, x_T: torch.Tensor, noise_generator=None, **step_kw) -> torch.Tensor:
    """Run the scheduler; with noise_generator, each step gets `variance_noise` drawn as our integrator draws it
    (DPMSolverMultistep would otherwise draw float32 noise, a different stream from our float64 one)."""
    x = x_T.clone()
    for k in scheduler.timesteps:
        kw = dict(step_kw)
        if noise_generator is not None:
            kw["variance_noise"] = randn_rows(x, noise_generator)
        x = scheduler.step(eps_model(x, k), k, x, **kw).prev_sample
    return x


def x_T_for(ts) -> torch.Tensor:
    return torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def agree(ours: torch.Tensor, ref: torch.Tensor) -> float:
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    return rel


@pytest.mark.parametrize("m", [5, 8, 16])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp(m, order):
    # diffusers: order 2 warm-up is the 2M midpoint rule, and with lower_order_final and fewer than 15 steps the
    # step before the last is order 2 as well: warmup="dpmpp", lower_order_final=True.
    sch = DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sch.set_timesteps(m)
    ts = [our_time(k) for k in sch.timesteps]
    name, params = ("dpmpp_2m", {}) if order == 2 else ("dpmpp_3m", {"warmup": "dpmpp", "lower_order_final": True})
    x_T = x_T_for(ts)
    agree(sample(D, x_T, baselines.get(name, ts, PROCESS, **params)), run_diffusers(sch, x_T))


def test_sde_dpm_solver_pp_same_noise():
    sch = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="sde-dpmsolver++", final_sigmas_type="zero")
    sch.set_timesteps(8)
    ts = [our_time(k) for k in sch.timesteps]
    x_T = x_T_for(ts)
    ours = sample(D, x_T, baselines.get("dpmpp_2m_sde", ts, PROCESS), generator=torch.Generator().manual_seed(5))
    agree(ours, run_diffusers(sch, x_T, noise_generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("m", [5, 10])
def test_unipc(variant, order, m):
    sch = UniPCMultistepScheduler(solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
                                  final_sigmas_type="zero")
    sch.set_timesteps(m)
    ts = [our_time(k) for k in sch.timesteps]
    x_T = x_T_for(ts)
    ours = sample(D, x_T, baselines.get(f"unipc_{variant}_{order}", ts, PROCESS))
    if variant == "bh2":
        ref = run_diffusers(sch, x_T)
    else:
        # diffusers' bh1 returns NaN on the step to sigma = 0 (B(h) = h is infinite there). That step is first
        # order, so it returns the model output at the predicted x_{M-1}: we stop diffusers one step early and
        # apply that same D ourselves. (The corrector diffusers would apply inside that step is never used.)
        x = x_T.clone()
        for k in sch.timesteps[:-1]:
            x = sch.step(eps_model(x, k), k, x).prev_sample
        ref = D(x, ts[-1])
    agree(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(eta):
    # "trailing" spacing puts every previous timestep on the grid (t - 1000 // m), and the last step uses
    # alpha_prev = 1: the predicted x0, our final denoise. With eta = 1 diffusers draws one noise tensor per step
    # from the generator (the last one unused), in the same order as the integrator.
    sch = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    m = 10
    sch.set_timesteps(m)
    ts = [our_time(k) for k in sch.timesteps]
    assert all(int(a) - int(b) == 1000 // m for a, b in zip(sch.timesteps[:-1], sch.timesteps[1:]))
    x_T = x_T_for(ts)
    name = "ddim" if eta == 0 else "ddim_eta1"
    ours = sample(D, x_T, baselines.get(name, ts, PROCESS), generator=torch.Generator().manual_seed(3))
    agree(ours, run_diffusers(sch, x_T, eta=eta, generator=torch.Generator().manual_seed(3)))
