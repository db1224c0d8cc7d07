"""Agreement with k-diffusion's samplers on the same inputs: same denoiser (an exact Gaussian-mixture D), same x_T,
same grid, and for stochastic samplers the same noise (k-diffusion's noise_sampler / global RNG fed from the
generator we pass).

Grids: k-diffusion steps through [s_0 .. s_{M-1}, 0]; its last step to sigma = 0 returns D(x, s_{M-1}), which is our
timesteps [s_0 .. s_{M-1}] with the final denoise. Everything runs in float64; agreement is asserted at 1e-4
relative as the issue asks and is in fact at rounding level (asserted at 1e-9).
"""

from __future__ import annotations


import pytest
import torch

from s3search import baselines, grids, processes, sample
from s3search.models.mixtures import grid_mixture
from s3search.named import NamedSchedule
from s3search.noise import randn_rows
from reference_libs import k_diffusion_sampling


K = k_diffusion_sampling()
GM = grid_mixture(3, 2, spacing=1.0, std=(0.2, 0.3))
D = GM.denoiser("edm")
M = 8  # model timesteps; k-diffusion's grid has M + 1 values ending in 0


def k_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return D(x, float(sigma[0]))


def setup(grid: str = "edm"):
    ts = grids.get(grid, "edm", M - 1, 40.0, 0.05)
    sigmas = torch.tensor(list(ts) + [0.0], dtype=torch.float64)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * ts[0]
    return ts, sigmas, x_T


def shared_noise(x: torch.Tensor, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: randn_rows(x, gen)


def assert_agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    assert rel < 1e-9, rel


@pytest.mark.parametrize("grid", ["edm", "logsnr"])
@pytest.mark.parametrize("name, k_fn, k_kwargs", [
    ("ddim", "sample_euler", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_3m", "sample_dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}),
])
def test_deterministic(grid, name, k_fn, k_kwargs):
    ts, sigmas, x_T = setup(grid)
    params = {"eta": 0.0} if name == "dpmpp_2m_sde" else {}
    ours = sample(D, x_T, baselines.get(name, ts, "edm", **params))
    ref = getattr(K, k_fn)(k_model, x_T.clone(), sigmas, disable=True, **k_kwargs)
    assert_agree(ours, ref)


@pytest.mark.parametrize("name, k_fn, k_kwargs, params", [
    ("ddim_eta1", "sample_euler_ancestral", {"eta": 1.0}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"}, {}),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.5, "solver_type": "midpoint"}, {"eta": 0.5}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}, {}),
    ("seeds_1", "sample_euler_ancestral", {"eta": 1.0}, {}),
])
def test_stochastic_same_noise(name, k_fn, k_kwargs, params):
    # k-diffusion draws one noise tensor per step except the step to 0; the integrator draws one per step.
    ts, sigmas, x_T = setup()
    ours = sample(D, x_T, baselines.get(name, ts, "edm", **params), generator=torch.Generator().manual_seed(7))
    ref = getattr(K, k_fn)(k_model, x_T.clone(), sigmas, disable=True, noise_sampler=shared_noise(x_T, 7),
                           **k_kwargs)
    assert_agree(ours, ref)


def test_edm_heun_matches_sample_heun():
    ts, sigmas, x_T = setup()
    ours = sample(D, x_T, baselines.get("edm_heun", ts, "edm"))
    ref = K.sample_heun(k_model, x_T.clone(), sigmas, disable=True)
    assert_agree(ours, ref)


def test_edm_heun_churn_matches_sample_heun():
    # k-diffusion draws its churn noise from the global RNG at every step (used or not), and also churns before
    # its last step (the step to 0). Our final denoise takes no churn, so s_tmin keeps churn off the last time;
    # the first M - 1 draws then coincide with ours from a generator with the same seed (churn must be on at every
    # earlier step, or k-diffusion's unused draws would shift the streams apart).
    ts, sigmas, x_T = setup()
    s_tmin = (ts[-1] + ts[-2]) / 2
    ours = sample(D, x_T, baselines.get("edm_heun", ts, "edm", s_churn=20.0, s_tmin=s_tmin),
                  generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    ref = K.sample_heun(k_model, x_T.clone(), sigmas, disable=True, s_churn=20.0, s_tmin=s_tmin)
    assert_agree(ours, ref)
    assert not torch.allclose(ours, sample(D, x_T, baselines.get("edm_heun", ts, "edm")))


def test_edm_heun_on_vp_equals_edm_in_ve_coordinates():
    # The same noise levels on a VP process: D_VP(x, t) = D_VE(x / alpha, sigma / alpha), outputs are equal.
    vp = processes.get("vp-linear")
    ts, _, x_T = setup()
    ts = [t for t in ts if t < vp.sigma_ve(vp.t_max)]
    vp_ts = tuple(vp.t_of_sigma_ve(s) for s in ts)
    D_vp = GM.denoiser("vp-linear")
    ours_vp = sample(D_vp, x_T * vp.alpha(vp_ts[0]), NamedSchedule(sampler="edm_heun", process="vp-linear",
                                                                    timesteps=vp_ts))
    ours_ve = sample(D, x_T, NamedSchedule(sampler="edm_heun", process="edm", timesteps=tuple(ts)))
    torch.testing.assert_close(ours_vp, ours_ve, rtol=1e-8, atol=1e-8)
