"""Gaussian-mixture test beds: exact denoiser, score, samples, density and probability-flow ODE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from s3search import processes
from s3search.models import registry
from s3search.models.mixtures import GaussianMixture, builtin_models, grid_mixture, image_mixture, mixture

F64 = torch.float64


def small_image_mixture() -> GaussianMixture:
    # Same construction as gmm-image but small enough for dense reference algebra.
    return image_mixture(shape=(2, 4, 4), k=3, rank=3, floor=1e-2, seed=5)


def dense_denoiser(gm: GaussianMixture, y: torch.Tensor, s: float) -> torch.Tensor:
    """docs/math.md §8 written with dense matrices and linear solves, independent of the eigen-form code."""
    covs = gm.covariances(0.0)
    eye = torch.eye(gm.dim, dtype=F64)
    logs, posts = [], []
    for k in range(gm.n_components):
        c = covs[k] + s * s * eye
        diff = y - gm.means[k]
        sol = torch.linalg.solve(c, diff.T).T
        logs.append(math.log(gm.weights[k]) - 0.5 * torch.logdet(c) - 0.5 * (diff * sol).sum(1))
        posts.append(gm.means[k] + sol @ covs[k])
    r = torch.softmax(torch.stack(logs, 1), 1)
    return torch.einsum("bk,kbd->bd", r, torch.stack(posts))


@pytest.mark.parametrize("make", [lambda: mixture("gmm-8x4"), lambda: mixture("gmm-64d"), small_image_mixture])
def test_denoiser_matches_dense_formula(make):
    gm = make()
    g = torch.Generator().manual_seed(1)
    for s in (0.05, 0.7, 12.0):
        y = gm.sample(16, g, sigma_end=s, dtype=F64).reshape(16, -1)
        torch.testing.assert_close(gm.denoise_ve(y, s), dense_denoiser(gm, y, s), rtol=1e-9, atol=1e-10)


def test_log_prob_matches_scipy():
    gm = small_image_mixture()
    x = gm.sample(7, torch.Generator().manual_seed(2), sigma_end=0.1, dtype=F64)
    covs = gm.covariances(0.1).numpy()
    dens = sum(float(gm.weights[k]) * multivariate_normal(gm.means[k].numpy(), covs[k]).pdf(x.reshape(7, -1).numpy())
               for k in range(gm.n_components))
    np.testing.assert_allclose(gm.log_prob(x, 0.1).numpy(), np.log(dens), rtol=1e-9)


@pytest.mark.parametrize("process", ["edm", "vp-linear"])
def test_denoiser_equals_finite_difference_score_identity(process):
    # D(x, t) = (x + sigma^2 grad log p_t(x)) / alpha, with grad log p_t from central differences of log_prob.
    gm = mixture("gmm-6x6")
    proc = processes.get(process)
    t = 0.8 if process == "edm" else 0.3
    a, sig = proc.alpha(t), proc.sigma(t)
    x = a * gm.sample(8, torch.Generator().manual_seed(3), sigma_end=sig / a, dtype=F64)

    def log_pt(xx: torch.Tensor) -> torch.Tensor:  # density of x_t = alpha x0 + sigma eps
        return gm.log_prob(xx / a, sig / a) - gm.dim * math.log(a)

    h = 1e-5
    grad = torch.stack([(log_pt(x + h * e) - log_pt(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=F64)], 1)
    expected = (x + sig**2 * grad) / a
    torch.testing.assert_close(gm.denoise(x, proc, t), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gm.score(x, proc, t), grad, rtol=1e-6, atol=1e-6)


def test_denoiser_matches_monte_carlo_posterior_mean():
    # E[x0 | x_t = x] by self-normalised importance sampling over exact draws of x0.
    gm = mixture("gmm-8x4")
    proc = processes.get("vp-linear")
    t = 0.4
    a, sig = proc.alpha(t), proc.sigma(t)
    x0 = gm.sample(400_000, torch.Generator().manual_seed(4), dtype=F64)
    points = a * gm.sample(4, torch.Generator().manual_seed(5), sigma_end=sig / a, dtype=F64)
    exact = gm.denoise(points, proc, t)
    for x, d in zip(points, exact):
        logw = -((x - a * x0) ** 2).sum(1) / (2 * sig**2)
        w = torch.softmax(logw, 0)
        est = (w[:, None] * x0).sum(0)
        # Standard error of a self-normalised estimate: sqrt(sum w^2 (x0 - est)^2).
        se = torch.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        assert torch.all((est - d).abs() < 5 * se + 1e-9), (est, d, se)


def test_exact_samples_pass_moment_check():
    gm = mixture("gmm-64d")
    n = 40_000
    for s in (0.0, 0.5):
        x = gm.sample(n, torch.Generator().manual_seed(6), sigma_end=s, dtype=F64)
        cov = gm.covariance(s)
        se_mean = torch.sqrt(torch.diagonal(cov) / n)
        assert torch.all((x.mean(0) - gm.mean()).abs() < 5 * se_mean)
        # Entry-wise covariance error against its standard error sqrt((C_ii C_jj + C_ij^2) / n) (Gaussian approx.).
        emp = torch.cov(x.T)
        se_cov = torch.sqrt((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov**2) / n)
        z = ((emp - cov) / se_cov).abs()
        assert z.max() < 7 and z.mean() < 1.2


def test_low_rank_samples_pass_moment_check():
    gm = small_image_mixture()
    x = gm.sample(60_000, torch.Generator().manual_seed(7), sigma_end=0.2, dtype=F64).reshape(60_000, -1)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(0.2), atol=0.02 * gm.covariance(0.2).abs().max(),
                               rtol=0)
    freq = torch.bincount(gm.responsibilities(x, 0.2).argmax(1), minlength=3).double() / 60_000
    assert torch.allclose(freq, gm.weights, atol=0.01)


def test_sample_rows_is_batch_invariant():
    gm = mixture("gmm-64d")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]
    full = gm.sample_rows(gens(), sigma_end=0.3)
    part = gm.sample_rows(gens()[2:4], sigma_end=0.3)
    torch.testing.assert_close(full[2:4], part)


def test_pf_ode_single_gaussian_closed_form_matches_dop853():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    single = GaussianMixture.from_covariances([1.0], rng.standard_normal((1, 5)), (a @ a.T / 5 + 0.01 * np.eye(5))[None])
    x_t = single.sample_noised(6, torch.Generator().manual_seed(8), "vp-linear", 0.9, dtype=F64)
    closed = single.exact_pf_ode(x_t, "vp-linear", 0.9, 0.01)
    numeric = single._pf_numeric(x_t / processes.get("vp-linear").alpha(0.9),
                                 processes.get("vp-linear").sigma_ve(0.9), processes.get("vp-linear").sigma_ve(0.01),
                                 1e-11, 1e-11) * processes.get("vp-linear").alpha(0.01)
    torch.testing.assert_close(closed, numeric, rtol=1e-7, atol=1e-8)


def test_pf_ode_single_gaussian_pushes_p_t_to_p_end():
    single = GaussianMixture.from_covariances([1.0], [[1.0, -2.0]], [[[0.5, 0.2], [0.2, 0.1]]])
    x_t = single.sample_noised(50_000, torch.Generator().manual_seed(9), "edm", 20.0, dtype=F64)
    x_end = single.exact_pf_ode(x_t, "edm", 20.0, 0.002)
    torch.testing.assert_close(x_end.mean(0), single.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x_end.T), single.covariance(0.002), atol=0.01, rtol=0)


def test_pf_ode_mixture_is_tolerance_stable_and_process_consistent():
    gm = grid_mixture(3, 3, spacing=1.0, std=(0.1, 0.1))
    vp = processes.get("vp-linear")
    x_t = gm.sample_noised(32, torch.Generator().manual_seed(10), vp, 0.7, dtype=F64)
    ref = gm.exact_pf_ode(x_t, vp, 0.7, 0.05)
    tighter = gm.exact_pf_ode(x_t, vp, 0.7, 0.05, rtol=5e-11, atol=5e-11)
    torch.testing.assert_close(ref, tighter, rtol=1e-7, atol=1e-8)
    # The same flow in EDM units: x_VP / alpha at sigma / alpha.
    edm = gm.exact_pf_ode(x_t / vp.alpha(0.7), "edm", vp.sigma_ve(0.7), vp.sigma_ve(0.05))
    torch.testing.assert_close(ref / vp.alpha(0.05), edm, rtol=1e-7, atol=1e-8)


def test_builtin_models_on_both_processes_and_registry():
    table = builtin_models()
    for base in ("gmm-8x8", "gmm-8x4", "gmm-6x6", "gmm-64d", "gmm-image"):
        assert table[base]().process.name == "edm"
        assert table[base + "-vp"]().process.name == "vp-linear"
    spec = registry.get("gmm-image")
    assert spec is registry.get("gmm-image")
    assert spec.shape == (3, 16, 16) and spec.exact.eigvecs.shape[2] < spec.exact.dim
    assert spec.provenance["weights_sha256"] == mixture("gmm-image").fingerprint()
    with pytest.raises(registry.UnknownModelError, match="gmm-64d") as err:
        registry.get("no-such-model")
    assert isinstance(err.value, KeyError)


def test_registry_file_models_are_merged(monkeypatch, tmp_path):
    import sys
    import types

    fake = types.ModuleType("s3search.models.local")
    fake.load_registry_file = lambda path: {"from-file": lambda: builtin_models()["gmm-8x8"]()}
    monkeypatch.setitem(sys.modules, "s3search.models.local", fake)
    monkeypatch.setenv(registry.ENV_REGISTRY, str(tmp_path / "models.toml"))
    assert "from-file" in registry.names() and "gmm-64d" in registry.names()
    assert registry.get("from-file").shape == (2,)


def test_invalid_mixture_raises_value_error():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture.from_covariances([-1.0, 2.0], np.zeros((2, 2)), np.stack([np.eye(2)] * 2))
    with pytest.raises(ValueError, match="floors"):
        GaussianMixture.from_low_rank([1.0], np.zeros((1, 3)), np.ones((1, 3, 1)), [0.0])
    with pytest.raises(ValueError, match="sigma"):
        mixture("gmm-8x8").denoise_ve(torch.zeros(1, 2, dtype=F64), 0.0)
