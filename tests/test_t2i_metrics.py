"""Image metrics of text-to-image models: fid against a reference file (precomputed Inception statistics or
reference images), clip-score with a local CLIP folder, both side by side in the extras, and metric_error.

Everything is random and built here: a tiny SD pipeline, a tiny CLIPModel written with an offline tokenizer, a
random-weight InceptionV3 (test_fid's fixture) and random statistics of the right shape. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from s3search import baselines, metrics
from s3search.evaluation import reference as reference_cache
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.metrics import frechet
from s3search.metrics.reference_stats import InceptionReference, open_reference
from s3search.models import registry
from s3search.models.base import single_threaded

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from s3search.models.tiny_pipelines import clip_tokenizer, tiny_pipeline  # noqa: E402
from test_fid import random_inception_file  # noqa: E402,F401  (the random-weight Inception fixture)

PROMPTS = "a cat\ndog\na cat dog\n"


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


def _tiny_clip(folder: Path) -> None:
    """A random CLIPModel (30 x 30 images, 16-d embeddings) and its processor, saved as a local folder."""
    tok, vocab = clip_tokenizer(folder / "tok")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=30, patch_size=6),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 30},
                                                      crop_size={"height": 30, "width": 30})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    # Random embeddings share a common direction, so every score has one sign. Make it positive: torchmetrics'
    # clamp at 0 would otherwise make every comparison 0 == 0.
    with torch.no_grad():
        probe = processor(text=["a cat"], images=[torch.full((3, 16, 16), 128, dtype=torch.uint8)],
                          return_tensors="pt", padding=True)
        out = model(**probe)
        if float((out.image_embeds * out.text_embeds).sum()) < 0:
            model.text_projection.weight.neg_()
    model.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")


def _stats_file(path: Path, dims: int = 2048, sigma_dims: int | None = None, seed: int = 0) -> Path:
    """Random mu and a random PSD sigma (low rank plus diagonal), float32, as pytorch-fid writes them."""
    rng = np.random.default_rng(seed)
    k = sigma_dims or dims
    g = rng.standard_normal((k, 16))
    np.savez(path, mu=rng.standard_normal(dims).astype(np.float32),
             sigma=(g @ g.T / 16 + np.diag(rng.uniform(0.1, 1.0, k))).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def t2i(tmp_path_factory, random_inception_file):
    """A registry file of one tiny SD pipeline under four entries: with both references, with reference images,
    with CLIP only, and with neither."""
    root = tmp_path_factory.mktemp("t2i-metrics")
    with single_threaded():
        tiny_pipeline("sd", root / "parts").save_pretrained(root / "pipe", safe_serialization=True)
        _tiny_clip(root)
    (root / "captions.txt").write_text(PROMPTS)
    _stats_file(root / "stats.npz")
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.save(root / "images.npy", images)
    common = 'kind = "diffusers-pipeline"\npath = "pipe"\ndevice = "cpu"\nguidance_scale = 3.0\n' \
             'prompts = "captions.txt"\n'
    inception = f'inception_weights = "{random_inception_file}"\n'
    (root / "models.toml").write_text(
        f'[models.both]\n{common}reference_stats = "stats.npz"\nclip = "clip"\n{inception}\n'
        f'[models.images]\n{common}reference_stats = "images.npy"\n{inception}\n'
        f'[models.clip-only]\n{common}clip = "clip"\n\n'
        f'[models.plain]\n{common}\n'
        f'[models.no-weights]\n{common}reference_stats = "stats.npz"\ninception_weights = "nowhere.pth"\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.ENV_REGISTRY, str(root / "models.toml"))
        registry.clear_cache()
        yield {"root": root, "images": images}
    registry.clear_cache()


def _schedule(spec, n: int = 3):
    return baselines.get("dpmpp_2m", timesteps=spec.scheduler_times(n), process=spec.process.name)


# ----- evaluation -----------------------------------------------------------------------------------------------
def test_fid_and_clip_score_evaluate_and_record_each_other(t2i, tmp_path):
    # Inception costs about a second an image on one CPU thread: two rows per evaluation.
    spec = registry.get("both")
    sched = _schedule(spec)
    (by_fid,) = LocalEvaluator(batch_size=1, cache_dir=str(tmp_path)).evaluate([sched], EvalRequest("both", "fid", 2))
    (by_clip,) = LocalEvaluator(batch_size=2, cache_dir=str(tmp_path)).evaluate(
        [sched], EvalRequest("both", "clip-score", 2))
    assert by_fid.ok and by_clip.ok, (by_fid.error, by_clip.error)
    assert math.isfinite(by_fid.value) and by_fid.value > 0 and by_clip.value < 0
    assert set(by_fid.extras) == set(by_clip.extras) == {"fid", "clip_score"}
    # Two evaluators, two batchings, the samples drawn twice: the same (prompt, noise) pairs give the same
    # figures, whichever metric is searched; clip_score is the published (positive) figure.
    assert by_fid.extras == pytest.approx(by_clip.extras, rel=1e-6)
    assert by_fid.extras["fid"] == by_fid.value and by_clip.extras["clip_score"] == -by_clip.value
    (trajectory,) = LocalEvaluator(trajectory_steps=8).evaluate([sched], EvalRequest("both", "trajectory", 2))
    assert trajectory.ok and trajectory.extras == {}   # no decode, no image figures


def test_clip_score_sees_each_rows_own_prompt(t2i):
    spec = registry.get("clip-only")
    sched = _schedule(spec)
    calls = []
    original = type(spec.clip).score

    def spy(self, images, prompts):
        calls.append(tuple(prompts))
        return original(self, images, prompts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(spec.clip), "score", spy)
        (res,) = LocalEvaluator(batch_size=2).evaluate([sched], EvalRequest("clip-only", "clip-score", 5, seed=2))
    assert res.ok, res.error
    from s3search.models.prompts import conditions_for

    expected = conditions_for(spec.prompt_sets["captions"], 2, "search", 0, 5).prompts
    assert calls == [expected] and set(res.extras) == {"clip_score"}


def test_clip_score_equals_torchmetrics_and_the_formula(t2i):
    from torchmetrics.multimodal.clip_score import CLIPScore

    spec = registry.get("clip-only")
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = ("a cat", "dog", "a cat dog", "dog", "cat")
    ours = spec.clip.score(images, prompts)
    model = transformers.CLIPModel.from_pretrained(str(t2i["root"] / "clip"), local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(t2i["root"] / "clip"), local_files_only=True)

    class Tensors(torch.nn.Module):
        """torchmetrics' model contract (embedding tensors), which transformers >= 5 no longer returns."""

        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_image_features(self, *a, **k):
            out = self.inner.get_image_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *a, **k):
            out = self.inner.get_text_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    reference = CLIPScore(model_name_or_path=lambda: (Tensors(), processor))
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        reference.update(uint8, list(prompts))
        expected = float(reference.compute())
        # the definition, by hand: 100 cos per row, mean, clamped at 0
        pixels = processor(images=list(uint8), return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        e_i = Tensors().get_image_features(pixel_values=pixels)
        e_t = Tensors().get_text_features(**tokens)
    rows = 100 * torch.nn.functional.cosine_similarity(e_i, e_t, dim=-1).double()
    assert rows.mean() > 0, "pick inputs whose mean score is positive, or the clamp hides everything"
    assert ours == pytest.approx(expected, rel=1e-5) and ours == pytest.approx(float(rows.mean()), rel=1e-5)
    torch.testing.assert_close(spec.clip.row_scores(images, prompts), rows, rtol=1e-5, atol=1e-4)


def test_an_image_array_reference_is_computed_once_and_cached(t2i, tmp_path):
    spec = registry.get("images")
    sched = _schedule(spec)
    read = []
    original = InceptionReference.image_batches

    def counting(self, batch=256):
        read.append(self.path)
        return original(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InceptionReference, "image_batches", counting)
        (res,) = LocalEvaluator(cache_dir=str(tmp_path)).evaluate([sched], EvalRequest("images", "fid", 2))
        # another sample count, seed and split, nothing in memory: the file on disk answers
        stats = reference_cache.load_or_compute(spec, metrics.get("fid"), 7, seed=3, split="test",
                                                root=str(tmp_path))
    assert res.ok, res.error
    assert len(read) == 1 and math.isfinite(res.value) and res.extras == {"fid": res.value}
    cached = list((tmp_path / "reference" / "images").glob("fid-nall-seedall-all-*.safetensors"))
    assert len(cached) == 1
    meta = json.loads(cached[0].with_suffix(".json").read_text())
    assert meta["reference_sha256"] == hashlib.sha256((t2i["root"] / "images.npy").read_bytes()).hexdigest()
    # the cached statistics are those of the images' Inception features
    real = torch.from_numpy(t2i["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, cov = frechet.gaussian_stats(spec.features(real))
    torch.testing.assert_close(stats["mean"], torch.from_numpy(mean), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["cov"], torch.from_numpy(cov), rtol=1e-6, atol=1e-6)


def test_precomputed_statistics_are_used_as_they_are(t2i, tmp_path):
    spec = registry.get("both")
    stats = reference_cache.load_or_compute(spec, metrics.get("fid"), 4, root=str(tmp_path))
    with np.load(t2i["root"] / "stats.npz") as z:
        assert torch.equal(stats["mean"], torch.from_numpy(z["mu"].astype(np.float64)))
        assert torch.equal(stats["cov"], torch.from_numpy(z["sigma"].astype(np.float64)))
    assert not (tmp_path / "reference").exists()     # the file is its own cache


def test_provenance_carries_the_reference_clip_and_inception_hashes(t2i, random_inception_file):
    both, plain = registry.get("both"), registry.get("plain")
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert both.provenance["reference_stats_sha256"] == sha(t2i["root"] / "stats.npz")
    assert both.provenance["features_sha256"] == sha(random_inception_file)
    assert len(both.provenance["clip_sha256"]) == 64
    assert not {"reference_stats_sha256", "clip_sha256", "features_sha256"} & set(plain.provenance)
    assert both.fingerprint != plain.fingerprint


# ----- what each model can compute ------------------------------------------------------------------------------
@pytest.mark.parametrize("model, metric, expected", [
    ("plain", "fid", "needs reference statistics: set reference_stats"),
    ("plain", "fd-features", "needs reference statistics: set reference_stats"),
    ("plain", "clip-score", "needs CLIP weights: set clip ="),
    ("clip-only", "fid", "needs reference statistics"),
    ("both", "fd", "reference samples in the model's own (latent) space"),
    ("both", "sw2", "use fid (registry field reference_stats), clip-score (field clip) or trajectory"),
    ("both", "mmd", "reference samples in the model's own (latent) space"),
    ("both", "nll", "needs a model with an exact density"),
    ("no-weights", "fid", "needs its Inception weights file"),
    ("gmm-64d", "clip-score", "is not a text-to-image model"),
])
def test_metric_error_names_the_missing_piece(t2i, model, metric, expected):
    assert expected in (registry.metric_error(model, metric) or "")


def test_metric_error_lists_what_each_entry_can_compute(t2i):
    def able(model: str) -> list[str]:
        message = registry.metric_error(model, "sw2")
        return message.split("(metrics it can compute: ")[1].rstrip(")").split(", ")

    assert able("both") == ["clip-score", "fd-features", "fid", "trajectory"]
    assert able("images") == ["fd-features", "fid", "trajectory"]
    assert able("clip-only") == ["clip-score", "trajectory"]
    assert able("plain") == ["trajectory"] and able("no-weights") == ["trajectory"]
    assert registry.metric_error("both", "fid") is None and registry.metric_error("both", "clip-score") is None


def test_evaluation_refuses_what_metric_error_refuses(t2i):
    sched = _schedule(registry.get("plain"))
    for metric in ("fid", "clip-score", "sw2"):
        (res,) = LocalEvaluator().evaluate([sched], EvalRequest("plain", metric, 2))
        assert not res.ok and res.error.split(": ", 1)[1] in registry.metric_error("plain", metric)


# ----- files that are wrong -------------------------------------------------------------------------------------
def _bad_entry(tmp_path: Path, field_lines: str) -> Path:
    (tmp_path / "models.toml").write_text(textwrap.dedent(f"""
        [models.bad]
        kind = "diffusers-pipeline"
        path = "pipe"
        prompts = "captions.txt"
    """) + field_lines)
    return tmp_path / "models.toml"


@pytest.mark.parametrize("write, match", [
    (lambda p: _stats_file(p / "s.npz", dims=100), r"mu \[100\] and sigma \[100, 100\]"),
    (lambda p: _stats_file(p / "s.npz", sigma_dims=2000), r"sigma \[2000, 2000\]"),
    (lambda p: np.savez(p / "s.npz", mu=np.zeros(2048)), "holds mu without sigma"),
    (lambda p: np.savez(p / "s.npz", a=np.zeros((4, 8, 8)), b=np.zeros(3)), "expected mu and sigma"),
    (lambda p: np.savez(p / "s.npz", images=np.zeros((4, 16, 16), np.uint8)), r"shape \[4, 16, 16\]"),
    (lambda p: np.savez(p / "s.npz", images=np.zeros((4, 16, 16, 3), np.int64)), "uint8 .* or float"),
    (lambda p: (p / "s.npz").write_bytes(b"not a zip"), "not a readable numpy file"),
])
def test_a_wrong_reference_file_names_the_entry_and_the_field(tmp_path, monkeypatch, write, match):
    from typer.testing import CliRunner

    from s3search.cli import app

    write(tmp_path)   # the pipeline folder is not even there: the file is checked first
    path = _bad_entry(tmp_path, 'reference_stats = "s.npz"\n')
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    registry.clear_cache()
    with pytest.raises(ValueError, match=match) as info:
        registry.get("bad")
    assert f"{path}: models.bad.reference_stats: " in str(info.value)
    run = CliRunner().invoke(app, ["models", "check", "bad", "--registry", str(path)])
    assert run.exit_code == 1 and "models.bad.reference_stats" in run.output
    registry.clear_cache()


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "does not exist"),
    (lambda p: (p / "clip").mkdir(), "config.json is missing"),
    (lambda p: ((p / "clip").mkdir(), (p / "clip" / "config.json").write_text('{"model_type": "siglip"}')),
     "model_type='siglip'"),
    (lambda p: ((p / "clip").mkdir(), (p / "clip" / "config.json").write_text('{"model_type": "clip"}'),
                (p / "clip" / "pytorch_model.bin").write_bytes(b"x")), "pytorch_model.bin is pickled"),
])
def test_a_wrong_clip_folder_names_the_entry_and_the_field(tmp_path, monkeypatch, make, match):
    make(tmp_path)
    monkeypatch.setenv(registry.ENV_REGISTRY, str(_bad_entry(tmp_path, 'clip = "clip"\n')))
    registry.clear_cache()
    with pytest.raises(ValueError, match=match) as info:
        registry.get("bad")
    assert "models.bad.clip: " in str(info.value)
    registry.clear_cache()


def test_registry_fields_are_checked(tmp_path, monkeypatch):
    from s3search.models import local

    with pytest.raises(ValueError, match="models.bad.inception_weights is used by fid"):
        local.parse_registry(_bad_entry(tmp_path, 'inception_weights = "w.pth"\n'))
    with pytest.raises(ValueError, match="models.bad.clip"):
        local.parse_registry(_bad_entry(tmp_path, "clip = 3\n"))
    (tmp_path / "models.toml").write_text('[models.u]\nkind = "torchscript"\npath = "m.pt"\nprocess = "edm"\n'
                                          'prediction_type = "eps"\nshape = [2]\nreference_stats = "s.npz"\n')
    with pytest.raises(ValueError, match="reference_stats applies to kind=diffusers-pipeline only"):
        local.parse_registry(tmp_path / "models.toml")


def test_float_reference_images_must_lie_in_the_unit_interval(tmp_path):
    np.save(tmp_path / "ok.npy", np.full((3, 3, 8, 8), 0.5, np.float32))
    (batch,) = open_reference(tmp_path / "ok.npy").image_batches()
    assert batch.shape == (3, 3, 8, 8) and torch.all(batch == 0.0)
    np.save(tmp_path / "signed.npy", np.full((3, 8, 8, 3), -0.5, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        list(open_reference(tmp_path / "signed.npy").image_batches())


def test_models_check_runs_decode_inception_and_clip(t2i):
    from s3search.cli.models_cmd import check_model

    report = check_model("both")
    assert report["feature_dim"] == 2048 and report["clip"].endswith("clip")
    assert report["reference_stats"]["kind"] == "stats" and report["reference_stats"]["shape"] == [2048]


# ----- the Fréchet distance against statistics --------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(12, 40), (64, 300), (50, 20)])
def test_frechet_distance_to_stats_equals_the_full_form(n, d):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    g = rng.standard_normal((d, d))
    mu2, cov2 = rng.standard_normal(d), g @ g.T / d + 0.1 * np.eye(d)
    full = frechet.frechet_distance(*frechet.gaussian_stats(x), mu2, cov2)
    # rel 1e-7: with n - 1 < d the full form sums square roots of d - n + 1 rounding-level eigenvalues (the
    # closed-form test below shows the sample form exact)
    assert frechet.frechet_distance_to_stats(x, mu2, cov2) == pytest.approx(full, rel=1e-7)


def test_frechet_distance_to_stats_closed_form_when_rank_deficient():
    # C2 = s I: tr (C2^1/2 C1 C2^1/2)^1/2 = sqrt(s) * sum of the singular values of the centred samples / sqrt(n-1)
    rng = np.random.default_rng(5)
    n, d, s = 20, 200, 2.0
    x = rng.standard_normal((n, d))
    centred = x - x.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    expected = (x.mean(0) ** 2).sum() + (centred ** 2).sum() / (n - 1) + s * d - 2 * np.sqrt(s) * sv.sum() / np.sqrt(n - 1)
    assert frechet.frechet_distance_to_stats(x, np.zeros(d), s * np.eye(d)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="stats do not match"):
        frechet.frechet_distance_to_stats(x, np.zeros(d - 1), np.eye(d - 1))
