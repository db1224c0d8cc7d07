"""Metrics: Fréchet distance, sliced W2, MMD, exact mixture metrics, trajectory error, and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist

from s3search import metrics
from s3search.metrics import frechet, mixture, mmd, sliced, trajectory
from s3search.models.base import ModelSpec
from s3search.models.mixtures import GaussianMixture, mixture as builtin_mixture
from s3search.denoisers import Denoiser
from s3search import processes

F64 = torch.float64


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.05 * np.eye(d)


# ----- Fréchet distance ---------------------------------------------------------------------------------------
def test_frechet_matches_sqrtm_form():
    rng = np.random.default_rng(0)
    for d in (1, 5, 30):
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        c1, c2 = random_spd(rng, d), random_spd(rng, d)
        ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
        assert frechet.frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8)


def test_frechet_rank_deficient_closed_form_and_self_distance():
    # Commuting (diagonal) covariances with zero variances: FD = |dm|^2 + sum (sqrt a - sqrt b)^2.
    a = np.array([0.0, 1.0, 4.0, 0.0, 2.0])
    b = np.array([0.0, 0.25, 0.0, 0.0, 2.0])
    m = np.array([1.0, 0, 0, 0, 0])
    expected = 1.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet.frechet_distance(m, np.diag(a), np.zeros(5), np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Fewer samples than dimensions: the sample covariance has rank 19 in 50-D; FD to itself is 0.
    x = torch.randn(20, 50, generator=torch.Generator().manual_seed(0), dtype=F64)
    mu, cov = frechet.gaussian_stats(x)
    assert abs(frechet.frechet_distance(mu, cov, mu, cov)) < 1e-9 * np.trace(cov)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="stats"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet.gaussian_stats(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


def test_fd_between_independent_exact_sample_sets_shrinks_like_one_over_n():
    gm = builtin_mixture("gmm-64d")
    g = torch.Generator().manual_seed(11)

    def mean_fd(n: int) -> float:
        return float(np.mean([frechet.frechet_distance_samples(gm.sample(n, g, dtype=F64), gm.sample(n, g, dtype=F64))
                              for _ in range(3)]))

    fds = [mean_fd(n) for n in (500, 2000, 8000)]
    # The bias of FD between two finite sample sets of the same law is O(1/n): x4 samples, about /4.
    for small, large in zip(fds, fds[1:]):
        assert 0.15 < large / small < 0.4, fds


# ----- sliced W2 ------------------------------------------------------------------------------------------------
def test_sw2_in_one_dimension_is_the_sorted_pairs_formula():
    x = torch.randn(300, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = 0.5 + 2.0 * torch.randn(300, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = float(((torch.sort(x[:, 0]).values - torch.sort(y[:, 0]).values) ** 2).mean())
    assert sliced.sliced_wasserstein2_squared(x, y, n_projections=8) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n_y", [6_000, 4_500])
def test_sw2_isotropic_gaussians_closed_form(n_y):
    # Projections of N(0, I) and N(m, s^2 I) are N(0, 1) and N(theta.m, s^2): SW2^2 = |m|^2 / d + (1 - s)^2.
    d, s = 3, 1.5
    m = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    x = torch.randn(6_000, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = m + s * torch.randn(n_y, d, generator=torch.Generator().manual_seed(4), dtype=F64)
    expected = float(m @ m) / d + (1 - s) ** 2
    assert sliced.sliced_wasserstein2_squared(x, y, n_projections=1024) == pytest.approx(expected, rel=0.08)


def test_sw2_projections_are_fixed_and_unit():
    a, b = sliced.projections(7, 16, seed=5), sliced.projections(7, 16, seed=5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(16, dtype=F64))


# ----- MMD ------------------------------------------------------------------------------------------------------
def test_mmd_matches_brute_force_in_blocks(monkeypatch):
    monkeypatch.setattr(mmd, "_BLOCK", 4)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), 0.3 + torch.randn(11, 3, generator=g, dtype=F64)
    ell = 1.3

    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / (2 * (ell * s) ** 2)) for s in (0.5, 1.0, 2.0))

    xn, yn = x.numpy(), y.numpy()
    kxx = sum(k(xn[i], xn[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    kyy = sum(k(yn[i], yn[j]) for i in range(11) for j in range(11) if i != j) / (11 * 10)
    kxy = sum(k(a, b) for a in xn for b in yn) / (9 * 11)
    assert mmd.mmd2_unbiased(x, y, ell, (0.5, 1.0, 2.0)) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)


def test_mmd_median_heuristic_and_sensitivity():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(400, 4, generator=g, dtype=F64)
    ell = mmd.median_distance(ref)
    assert ell == pytest.approx(float(np.median(pdist(ref.numpy()))), rel=1e-12)
    same = [mmd.mmd2_unbiased(torch.randn(400, 4, generator=g, dtype=F64), ref, ell) for _ in range(5)]
    shifted = mmd.mmd2_unbiased(0.5 + torch.randn(400, 4, generator=g, dtype=F64), ref, ell)
    assert shifted > 10 * max(abs(v) for v in same)


# ----- exact mixture metrics ---------------------------------------------------------------------------------------
def test_nll_of_exact_samples_is_the_entropy_and_matches_scipy():
    gm = builtin_mixture("gmm-6x6")
    g = torch.Generator().manual_seed(7)
    h = mixture.entropy_mc(gm, 50_000, g)
    x = gm.sample(20_000, g, dtype=F64)
    logp = gm.log_prob(x)
    se = float(logp.std()) / np.sqrt(20_000)
    assert abs(mixture.nll(x, gm) - h) < 5 * se
    from scipy.stats import multivariate_normal

    covs = gm.covariances().numpy()
    dens = sum(float(gm.weights[k]) * multivariate_normal(gm.means[k].numpy(), covs[k]).pdf(x[:50].numpy())
               for k in range(gm.n_components))
    assert mixture.nll(x[:50], gm) == pytest.approx(-np.log(dens).mean(), rel=1e-10)


def test_mode_tv_and_outlier_rate():
    gm = builtin_mixture("gmm-6x6")
    g = torch.Generator().manual_seed(8)
    x = gm.sample(40_000, g, dtype=F64)
    assert mixture.mode_weight_tv(x, gm) < 0.02
    # Collapse onto component 0: the TV distance is 1 - w_0.
    single = GaussianMixture(gm.weights[:1] / gm.weights[:1], gm.means[:1], gm.eigvecs[:1], gm.eigvals[:1],
                             gm.floors[:1], gm.shape)
    collapsed = single.sample(1000, g, dtype=F64)
    assert mixture.mode_weight_tv(collapsed, gm) == pytest.approx(1 - float(gm.weights[0]), abs=1e-12)
    thr = mixture.outlier_threshold(gm.sample(40_000, g, dtype=F64), gm)
    rate = mixture.outlier_rate(x, gm, thr)
    assert abs(rate - 1e-3) < 5 * np.sqrt(1e-3 / 40_000) + 1e-3 / 2
    assert mixture.outlier_rate(x + 0.2, gm, thr) > 0.5


def test_trajectory_error_is_rms_per_coordinate():
    ref = torch.zeros(3, 2, 2)
    x = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert trajectory.trajectory_error(x, ref) == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="shape"):
        trajectory.trajectory_error(x, ref[:2])


# ----- the registry ------------------------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert {"fd", "fd-features", "sw2", "mmd", "nll", "mode-tv", "trajectory"} <= set(metrics.names())
    with pytest.raises(metrics.UnknownMetricError, match="sw2") as err:
        metrics.get("fid-typo")
    assert isinstance(err.value, KeyError)
    assert metrics.get("nll").needs_exact and metrics.get("fd-features").needs_features
    assert metrics.get("trajectory").needs_trajectory_reference and metrics.get("sw2").needs_reference


def _plain_model(features=None) -> ModelSpec:
    # A model without an exact density: reference samples come from its sampler.
    gm = builtin_mixture("gmm-64d")
    den = Denoiser(fn=lambda x, t: x, process=processes.get("edm"))
    return ModelSpec("plain", den, gm.shape, reference_sampler=lambda n, g: gm.sample(n, g, dtype=F64),
                     features=features)


def test_check_model_names_what_is_missing():
    with pytest.raises(ValueError, match="exact density"):
        metrics.get("nll").check_model(_plain_model())
    with pytest.raises(ValueError, match="feature network"):
        metrics.get("fd-features").check_model(_plain_model())


def test_fd_features_with_identity_features_equals_data_fd():
    model = _plain_model(features=lambda x: x)
    g = torch.Generator().manual_seed(9)
    draw = lambda: model.reference_sampler(3000, torch.Generator().manual_seed(1))
    x = model.reference_sampler(1000, g)
    values = []
    for name in ("fd", "fd-features"):
        m = metrics.get(name)
        values.append(m.compute(x, metrics.MetricContext(model, m.reference_stats(model, draw))))
    assert values[0] == pytest.approx(values[1], rel=1e-12) and values[0] > 0


def test_fd_metric_uses_exact_mixture_moments():
    spec_gm = builtin_mixture("gmm-64d")
    from s3search.models.mixtures import model_spec

    spec = model_spec(spec_gm, "gmm-64d", "edm")
    stats = metrics.get("fd").reference_stats(spec, lambda: pytest.fail("exact moments need no draw"))
    torch.testing.assert_close(stats["cov"], spec_gm.covariance())
