"""The built-in digits test bed: committed weights, provenance, preconditioning, and that it really denoises."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from s3search import processes
from s3search.denoisers import Denoiser
from s3search.models import digits, registry
from s3search.models.digits_features import FEATURES_FILE, load_classifier


@pytest.fixture(scope="module")
def spec():
    return digits.make_digits_spec()


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads(digits.PROVENANCE_FILE.read_text())


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    images, _ = digits.load_digits_data()
    return digits.to_model_range(images)


def test_assets_are_small_and_match_their_provenance(provenance) -> None:
    images, _ = digits.load_digits_data()
    assert provenance["data_sha256"] == digits.data_sha256(images)
    for path, key in ((digits.DENOISER_FILE, "denoiser_sha256"), (FEATURES_FILE, "classifier_sha256")):
        assert path.stat().st_size < 2 * 1024 * 1024
        assert hashlib.sha256(path.read_bytes()).hexdigest() == provenance[key]
    for key in ("seed", "denoiser_steps", "denoiser_final_train_loss", "classifier_test_accuracy", "command"):
        assert key in provenance


def test_registry_builds_the_digits_spec(spec) -> None:
    assert "digits" in registry.names()
    assert spec.shape == (1, 8, 8) and spec.process is processes.get("edm")
    assert spec.default_metric == "fd-features" and spec.denoiser.data_mean.shape == (1, 8, 8)
    assert spec.provenance["denoiser_sha256"] == spec.provenance["weights_sha256"]


def test_reference_sampler_draws_real_digits_by_seed(spec, real) -> None:
    a = spec.reference_sampler(50, torch.Generator().manual_seed(5))
    b = spec.reference_sampler(50, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == (50, 1, 8, 8)
    # Pixel values are the 17 levels v / 8 - 1 of real digits, and every row is an image of the data set.
    assert torch.equal((a + 1) * 8, ((a + 1) * 8).round()) and a.min() >= -1 and a.max() <= 1
    flat = real.reshape(len(real), -1)
    assert all((flat == row).all(1).any() for row in a.reshape(50, -1))
    with pytest.raises(ValueError, match="n="):
        spec.reference_sampler(0, torch.Generator())


def test_classifier_accuracy_reproduces_provenance(provenance) -> None:
    from sklearn.model_selection import train_test_split

    images, labels = digits.load_digits_data()
    _, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                   random_state=provenance["seed"])
    net, meta = load_classifier()
    with torch.no_grad():
        pred = net(digits.to_model_range(images[test_idx])).argmax(1).numpy()
    accuracy = float((pred == labels[test_idx]).mean())
    # float16 storage may move a borderline test digit; the recorded figure is from the float32 network.
    assert accuracy > 0.9 and abs(accuracy - provenance["classifier_test_accuracy"]) <= 2 / len(test_idx)


def test_features_are_64d_and_clamp_to_the_data_range(spec, real) -> None:
    x = real[:16]
    f = spec.features(x)
    assert f.shape == (16, 64) and torch.isfinite(f).all()
    torch.testing.assert_close(spec.features(x * 3.0), spec.features((x * 3.0).clamp(-1, 1)))


def test_edm_preconditioning_with_a_zero_network_is_the_gaussian_denoiser() -> None:
    # F = 0 leaves D = c_skip x = sigma_d^2 / (sigma^2 + sigma_d^2) x: the exact denoiser of N(0, sigma_d^2) data.
    class Zero(torch.nn.Module):
        def forward(self, x, c_noise):
            return torch.zeros_like(x)

    x, sigma, sd = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 3.0, 80.0]), 0.7
    expected = (sd**2 / (sigma**2 + sd**2)).reshape(-1, 1, 1, 1) * x
    torch.testing.assert_close(digits.edm_denoise(Zero(), x, sigma, sd), expected)


def test_the_trained_network_denoises(spec, real) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = real[torch.randint(len(real), (256,), generator=gen)]
    # Returning the noisy input costs sigma^2; a denoiser removes a growing share of it as sigma grows (the
    # trained network leaves about 0.51, 0.21, 0.10 of sigma^2 at these levels).
    for sigma, share in ((0.05, 0.8), (0.3, 0.5), (1.0, 0.25)):
        noisy = x0 + sigma * torch.randn(x0.shape, generator=gen)
        mse = float(((spec.denoiser(noisy, sigma) - x0) ** 2).mean())
        assert mse < share * sigma**2, (sigma, mse)
    # At sigma = 80 E[x0 | x] is nearly the data mean (the network sees such sigma rarely in training: ~0.1 of
    # the data variance away; returning zeros would be ~0.6 away).
    far = spec.denoiser(80.0 * torch.randn(64, 1, 8, 8, generator=gen), 80.0)
    assert float(((far - spec.denoiser.data_mean) ** 2).mean()) < 0.25 * float(real.var())


def test_vp_view_is_the_same_model_at_equal_logsnr(spec) -> None:
    proc = processes.get("vp-linear")
    view = digits.vp_view(spec.denoiser, proc)
    assert isinstance(view, Denoiser) and view.process is proc
    x, t = torch.randn(3, 1, 8, 8), 0.4
    torch.testing.assert_close(view(proc.alpha(t) * x, t), spec.denoiser(x, proc.sigma_ve(t)), rtol=1e-5, atol=1e-5)


def test_dtype_follows_the_input(spec) -> None:
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert spec.denoiser(x, 1.0).dtype == torch.float64


def test_the_reference_is_the_whole_data_set_for_every_split(spec, real, tmp_path) -> None:
    from s3search import metrics
    from s3search.evaluation import reference

    whole = spec.reference_set()
    assert torch.equal(whole, real) and whole.shape == (1797, 1, 8, 8)
    fd = metrics.get("fd-features")
    search = reference.load_or_compute(spec, fd, 500, seed=0, split="search", root=tmp_path)
    test = reference.load_or_compute(spec, fd, 2000, seed=3, split="test", root=tmp_path)
    torch.testing.assert_close(search["mean"], test["mean"])
    torch.testing.assert_close(search["cov"], test["cov"])
