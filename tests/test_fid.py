"""FID through torchmetrics / torch-fidelity with local Inception weights (randomly initialised here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from s3search.metrics import fid
from s3search.metrics.frechet import frechet_distance


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory) -> str:
    """The InceptionV3 FID architecture with random weights, saved as safetensors (no download, no pickle)."""
    tfi = fid._torch_fidelity_inception()
    with pytest.MonkeyPatch.context() as mp:
        # Construct without any weights: the download hook returns nothing and loading is skipped.
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("random", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception-random.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _exact_samples(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ v @ np.diag(w**-0.5) @ v.T            # now cov(z) = I exactly
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def test_known_gaussians_closed_form() -> None:
    # C1 = a I and C2 = Q diag(l) Q^T: tr (C1^1/2 C2 C1^1/2)^1/2 = sum sqrt(a l), so FD is known in closed form.
    rng = np.random.default_rng(1)
    d, a = 6, 0.7
    lam = rng.uniform(0.2, 3.0, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    c2 = q @ np.diag(lam) @ q.T
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = ((m1 - m2) ** 2).sum() + d * a + lam.sum() - 2 * np.sqrt(a * lam).sum()
    got = fid.fid_from_stats(torch.from_numpy(m1), torch.from_numpy(a * np.eye(d)), torch.from_numpy(m2),
                             torch.from_numpy(c2))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_fid_streaming_reproduces_known_gaussians_exactly() -> None:
    # The same accumulation torchmetrics does on Inception features, fed features with exactly known moments.
    rng = np.random.default_rng(2)
    d = 5
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    x, y = _exact_samples(m1, c1, 300, 3), _exact_samples(m2, c2, 200, 4)

    class Identity(nn.Module):
        num_features = d

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t

    metric = fid._torchmetrics_fid().FrechetInceptionDistance(feature=Identity())
    for chunk in x.split(64):
        metric.update(chunk, real=True)
    for chunk in y.split(64):
        metric.update(chunk, real=False)
    # Reference: the project's eigh-based Fréchet distance on the exact parameters.
    assert float(metric.compute()) == pytest.approx(frechet_distance(m1, c1, m2, c2), rel=1e-9)


def test_missing_weights_error_names_file_and_place(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(fid.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        fid.load_inception()
    message = str(err.value)
    assert fid.WEIGHTS_FILENAME in message and fid.ENV_WEIGHTS in message
    assert str(tmp_path / "s3search" / fid.WEIGHTS_FILENAME) in message
    monkeypatch.setenv(fid.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth.*does not exist"):
        fid.InceptionFeatures()(torch.zeros(2, 1, 8, 8))


def test_wrong_formats_give_clear_errors(tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a state dict"):
        fid.load_inception(garbage)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ValueError, match="not an InceptionV3 FID state dict"):
        fid.load_inception(wrong)
    with pytest.raises(ValueError, match="feature="):
        fid.load_inception(wrong, feature="1000")


class _Payload:
    """Stands for an arbitrary pickled object, which weights_only loading must refuse."""


def test_pickled_objects_are_refused(tmp_path) -> None:
    # A .pth with anything but tensors is refused by torch.load(weights_only=True): no code runs on load.
    evil = tmp_path / "evil.pth"
    torch.save({"a": torch.zeros(1), "b": _Payload()}, str(evil))
    with pytest.raises(ValueError, match="could not be read"):
        fid.load_inception(evil)


def test_random_inception_features_from_local_file(random_inception_file, monkeypatch) -> None:
    monkeypatch.setenv(fid.ENV_WEIGHTS, random_inception_file)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    feats = fid.InceptionFeatures()(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    # Two different images give different features: the weights are really loaded and used.
    assert not torch.allclose(feats[0], feats[1])


def test_pth_and_safetensors_load_the_same_network(random_inception_file, tmp_path) -> None:
    from safetensors.torch import load_file

    pth = tmp_path / fid.WEIGHTS_FILENAME  # the upstream file's format: a plain state dict
    torch.save(load_file(random_inception_file), str(pth))
    images = torch.rand(3, 3, 8, 8)
    a = fid.InceptionFeatures(random_inception_file, feature="64")(images)
    b = fid.InceptionFeatures(pth, feature="64")(images)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fid_between_image_sets(random_inception_file) -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    fake = (torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1) * 0.3
    value = fid.frechet_inception_distance(real, fake, random_inception_file, feature="64", batch_size=4)
    # The same distance from the features and the project's own Fréchet code (float32 features).
    feats = fid.InceptionFeatures(random_inception_file, feature="64")
    fr, ff = feats(real).double(), feats(fake).double()
    reference = frechet_distance(fr.mean(0), torch.cov(fr.T), ff.mean(0), torch.cov(ff.T))
    assert value > 0 and value == pytest.approx(reference, rel=1e-3)
    same = fid.frechet_inception_distance(real, real, random_inception_file, feature="64")
    assert abs(same) < 1e-3 * value


def test_to_uint8_rgb() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    out = fid.to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, 1].flatten().tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="shape"):
        fid.to_uint8_rgb(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="data_range"):
        fid.to_uint8_rgb(torch.zeros(1, 1, 2, 2), data_range=(1.0, 1.0))


def test_registry_entry_with_inception_features(random_inception_file, tmp_path, monkeypatch) -> None:
    import hashlib

    from s3search.models import local

    (tmp_path / "c2_fid_models.py").write_text(
        "from s3search import processes\nfrom s3search.denoisers import Denoiser\n"
        "def make():\n    return Denoiser(fn=lambda x, t: x, process=processes.get('edm'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np_images = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8).numpy()
    import numpy as np
    np.save(tmp_path / "ref.npy", np_images)
    registry_file = tmp_path / "models.toml"
    registry_file.write_text(f'[models.img]\nkind = "entrypoint"\npath = "c2_fid_models:make"\nshape = [3, 8, 8]\n'
                             f'reference = "ref.npy"\nfeatures = "inception"\n'
                             f'inception_weights = "{random_inception_file}"\n')
    spec = local.load_registry_file(registry_file)["img"]()
    assert spec.default_metric == "fd-features"
    with open(random_inception_file, "rb") as f:
        assert spec.provenance["features_sha256"] == hashlib.sha256(f.read()).hexdigest()
    feats = spec.features(spec.reference_sampler(2, torch.Generator().manual_seed(0)))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_fid_metric_refuses_non_inception_features():
    from s3search import metrics
    from s3search.models import registry

    with pytest.raises(ValueError, match="Inception"):
        metrics.get("fid").check_model(registry.get("digits"))
    metrics.get("fd-features").check_model(registry.get("digits"))
