"""Models from a local path: tiny random diffusers UNets, TorchScript files and entry points, saved in tmp_path."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from s3search import processes
from s3search.models import local, registry

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 8, 8)


def _tiny_unet(num_class_embeds: int | None = None, out_channels: int = 1):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds).eval()


def _save_unet(root, unet, prediction_type: str, beta_schedule: str = "linear", pipeline_layout: bool = False):
    scheduler = diffusers.DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    if pipeline_layout:
        unet.save_pretrained(root / "unet")
        scheduler.save_config(root / "scheduler")
    else:
        unet.save_pretrained(root)
        scheduler.save_config(root)
    return scheduler


def _write(tmp_path, text: str, name: str = "models.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _load(path, name: str):
    return local.load_registry_file(path)[name]()


def _coeffs(scheduler, n: int) -> tuple[float, float]:
    abar = float(scheduler.alphas_cumprod[n].double())
    return abar**0.5, (1 - abar) ** 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_unet_matches_hand_computed_x0(tmp_path, prediction_type) -> None:
    unet = _tiny_unet()
    scheduler = _save_unet(tmp_path / "unet", unet, prediction_type)
    spec = _load(_write(tmp_path, """
        [models.tiny]
        kind = "diffusers-unet"
        path = "unet"
    """), "tiny")
    assert spec.shape == SHAPE and spec.process is processes.get("vp-discrete")
    n = 417  # a training step: t = (n + 1) / N
    t = (n + 1) / 1000
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unet(x, torch.full((3,), n), ).sample
    a, s = _coeffs(scheduler, n)
    expected = {"epsilon": (x - s * out) / a, "v_prediction": a * x - s * out, "sample": out}[prediction_type]
    torch.testing.assert_close(spec.denoiser(x, t), expected, rtol=1e-4, atol=1e-4)


def test_pipeline_layout_and_non_default_betas_are_viewed_on_edm(tmp_path) -> None:
    unet = _tiny_unet()
    scheduler = _save_unet(tmp_path / "pipe", unet, "epsilon", beta_schedule="squaredcos_cap_v2",
                           pipeline_layout=True)
    spec = _load(_write(tmp_path, """
        [models.cos]
        kind = "diffusers-unet"
        path = "pipe"
    """), "cos")
    # Cosine betas are not the registered vp-discrete: the model is exposed on edm at equal logSNR.
    assert spec.process.name == "edm" and "viewed on edm" in spec.provenance["process_note"]
    n = 300
    a, s = _coeffs(scheduler, n)
    sigma = s / a
    x_ve = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eps = unet(a * x_ve, torch.full((2,), n)).sample
    torch.testing.assert_close(spec.denoiser(x_ve, sigma), (a * x_ve - s * eps) / a, rtol=1e-4, atol=1e-4)


def test_class_conditional_unet_with_guidance(tmp_path) -> None:
    unet = _tiny_unet(num_class_embeds=3)
    scheduler = _save_unet(tmp_path / "cond", unet, "epsilon")
    spec = _load(_write(tmp_path, """
        [models.guided]
        kind = "diffusers-unet"
        path = "cond"
        class_label = 1
        null_label = 2
        guidance_scale = 2.5
    """), "guided")
    n = 600
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    a, s = _coeffs(scheduler, n)
    with torch.no_grad():
        d_c = (x - s * unet(x, torch.full((2,), n), class_labels=torch.tensor([1, 1])).sample) / a
        d_u = (x - s * unet(x, torch.full((2,), n), class_labels=torch.tensor([2, 2])).sample) / a
    torch.testing.assert_close(spec.denoiser(x, (n + 1) / 1000), d_u + 2.5 * (d_c - d_u), rtol=1e-4, atol=1e-4)
    assert spec.provenance["guidance_scale"] == "2.5"


class _EpsNet(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + t.reshape(-1, 1, 1, 1)


class _CondNet(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x * t.reshape(-1, 1, 1, 1) + labels.reshape(-1, 1, 1, 1).to(x.dtype)


def test_torchscript_eps_on_vp_linear(tmp_path) -> None:
    torch.jit.save(torch.jit.script(_EpsNet()), str(tmp_path / "net.pt"))
    spec = _load(_write(tmp_path, """
        [models.ts]
        kind = "torchscript"
        path = "net.pt"
        process = "vp-linear"
        prediction_type = "eps"
        time_input = "t*1000"
        shape = [1, 8, 8]
    """), "ts")
    proc = processes.get("vp-linear")
    t = 0.37
    x = torch.randn(2, *SHAPE)
    eps = 0.5 * x + 1000 * t
    torch.testing.assert_close(spec.denoiser(x, t), (x - proc.sigma(t) * eps) / proc.alpha(t))
    # The weights hash keys the cached reference statistics.
    import hashlib
    assert spec.provenance["weights_sha256"] == hashlib.sha256((tmp_path / "net.pt").read_bytes()).hexdigest()


def test_torchscript_conditional_guided_x0(tmp_path) -> None:
    torch.jit.save(torch.jit.script(_CondNet()), str(tmp_path / "cond.pt"))
    spec = _load(_write(tmp_path, """
        [models.tsc]
        kind = "torchscript"
        path = "cond.pt"
        process = "edm"
        prediction_type = "x0"
        shape = [1, 8, 8]
        class_label = 4
        null_label = 0
        guidance_scale = 3.0
    """), "tsc")
    x = torch.randn(2, *SHAPE)
    sigma = 2.0
    d_c, d_u = x * sigma + 4, x * sigma
    torch.testing.assert_close(spec.denoiser(x, sigma), d_u + 3.0 * (d_c - d_u))


ENTRYPOINT_MODULE = '''
import torch
from s3search import processes
from s3search.denoisers import Denoiser

def make(shift=0.0, class_label=None):
    offset = shift + (0.0 if class_label is None else float(class_label))
    return Denoiser(fn=lambda x, t: x / (1.0 + t * t) + offset, process=processes.get("edm"))

def features():
    return lambda x: x.reshape(x.shape[0], -1)[:, :4]

def not_a_denoiser():
    return 42
'''


@pytest.fixture()
def entry_module(tmp_path, monkeypatch):
    (tmp_path / "c2_user_models.py").write_text(ENTRYPOINT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "c2_user_models"


def test_entrypoint_factory_with_options_reference_and_features(tmp_path, entry_module) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, *SHAPE), dtype=np.uint8)
    np.save(tmp_path / "ref.npy", images)
    path = _write(tmp_path, json.dumps({"models": [{
        "name": "ep", "kind": "entrypoint", "path": f"{entry_module}:make", "shape": list(SHAPE),
        "options": {"shift": 0.25}, "reference": "ref.npy", "features": f"{entry_module}:features"}]}),
        name="models.json")
    spec = _load(path, "ep")
    x = torch.ones(2, *SHAPE)
    torch.testing.assert_close(spec.denoiser(x, 1.0), x / 2 + 0.25)
    ref = spec.reference_sampler(7, torch.Generator().manual_seed(0))
    assert ref.shape == (7, *SHAPE) and ref.min() >= -1 and ref.max() <= 1
    expected_mean = torch.from_numpy(images.astype(np.float32) / 255 * 2 - 1).mean(0)
    torch.testing.assert_close(spec.denoiser.data_mean, expected_mean)
    assert spec.features(ref).shape == (7, 4) and spec.default_metric == "fd-features"


def test_entrypoint_guidance_combines_two_denoisers(tmp_path, entry_module) -> None:
    spec = _load(_write(tmp_path, f"""
        [models.epg]
        kind = "entrypoint"
        path = "{entry_module}:make"
        shape = [2]
        class_label = 3
        null_label = 1
        guidance_scale = 2.0
    """), "epg")
    x = torch.zeros(1, 2)
    torch.testing.assert_close(spec.denoiser(x, 1.0), torch.full((1, 2), 1.0 + 2.0 * (3.0 - 1.0)))


def test_registry_env_exposes_file_models(tmp_path, entry_module, monkeypatch) -> None:
    path = _write(tmp_path, f"""
        [models.from-file]
        kind = "entrypoint"
        path = "{entry_module}:make"
        shape = [2]
    """)
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    registry.clear_cache()
    try:
        assert "from-file" in registry.names()
        assert registry.get("from-file").shape == (2,)
    finally:
        registry.clear_cache()


# ----- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, match", [
    ('kind = "onnx"\npath = "x"', r"models\.m\.kind='onnx' must be one of"),
    ('kind = "torchscript"\npath = "x.pt"\nprediction_type = "eps"\nshape = [2]', r"models\.m\.process is required"),
    ('kind = "torchscript"\npath = "x.pt"\nprocess = "edm"\nprediction_type = "eps"', r"models\.m\.shape is required"),
    ('kind = "torchscript"\npath = "x.pt"\nprocess = "nope"\nprediction_type = "eps"\nshape = [2]',
     r"models\.m\.process='nope'"),
    ('kind = "torchscript"\npath = "x.pt"\nprocess = "edm"\nprediction_type = "score"\nshape = [2]',
     r"models\.m\.prediction_type='score'"),
    ('kind = "entrypoint"\npath = "no_colon"\nshape = [2]', r"models\.m\.path='no_colon' must be"),
    ('kind = "entrypoint"\npath = "a:b"\nshape = [0]', r"models\.m\.shape=\[0\]"),
    ('kind = "entrypoint"\npath = "a:b"\nshape = [2]\nguidance_scale = 2.0', r"models\.m\.class_label is required"),
    ('kind = "torchscript"\npath = "x.pt"\nprocess = "edm"\nprediction_type = "eps"\nshape = [2]\n'
     'class_label = 1\nguidance_scale = 2.0', r"models\.m\.null_label"),
    ('kind = "entrypoint"\npath = "a:b"\nshape = [2]\npaht = "typo"', r"unknown field\(s\) paht"),
    ('kind = "entrypoint"\npath = "a:b"\nshape = [2]\ndata_range = [1, -1]', r"models\.m\.data_range"),
])
def test_bad_entries_name_entry_and_field(tmp_path, body, match) -> None:
    path = _write(tmp_path, "[models.m]\n" + body + "\n")
    with pytest.raises(ValueError, match=match):
        local.load_registry_file(path)


def test_bad_registry_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local.load_registry_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        local.load_registry_file(_write(tmp_path, "[models.x\n"))
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        local.load_registry_file(_write(tmp_path, "{}", name="models.yaml"))
    with pytest.raises(ValueError, match="'models'"):
        local.load_registry_file(_write(tmp_path, '{"model": {}}', name="m.json"))


def test_missing_paths_raise_file_not_found_naming_the_field(tmp_path) -> None:
    path = _write(tmp_path, """
        [models.gone]
        kind = "diffusers-unet"
        path = "no/such/dir"
        [models.gone-ts]
        kind = "torchscript"
        path = "no.pt"
        process = "edm"
        prediction_type = "eps"
        shape = [2]
    """)
    factories = local.load_registry_file(path)  # reading the file loads nothing
    with pytest.raises(FileNotFoundError, match=r"models\.gone\.path: .*no/such/dir does not exist"):
        factories["gone"]()
    with pytest.raises(FileNotFoundError, match=r"models\.gone-ts\.path: .*no\.pt does not exist"):
        factories["gone-ts"]()


def test_wrong_formats_give_clear_errors(tmp_path, entry_module) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x00not torchscript")
    (tmp_path / "emptydir").mkdir()
    unet_dir = tmp_path / "binonly"
    _save_unet(unet_dir, _tiny_unet(), "epsilon")
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model.bin")
    np.save(tmp_path / "badref.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    path = _write(tmp_path, f"""
        [models.garbage]
        kind = "torchscript"
        path = "garbage.pt"
        process = "edm"
        prediction_type = "eps"
        shape = [2]
        [models.dir-for-file]
        kind = "torchscript"
        path = "emptydir"
        process = "edm"
        prediction_type = "eps"
        shape = [2]
        [models.no-config]
        kind = "diffusers-unet"
        path = "emptydir"
        [models.pickle-only]
        kind = "diffusers-unet"
        path = "binonly"
        [models.file-for-dir]
        kind = "diffusers-unet"
        path = "garbage.pt"
        [models.wrong-return]
        kind = "entrypoint"
        path = "{entry_module}:not_a_denoiser"
        shape = [2]
        [models.no-module]
        kind = "entrypoint"
        path = "surely_not_a_module_c2:make"
        shape = [2]
        [models.bad-json]
        kind = "diffusers-unet"
        path = "badjson"
        [models.bad-ref]
        kind = "entrypoint"
        path = "{entry_module}:make"
        shape = [1, 8, 8]
        reference = "badref.npy"
    """)
    f = local.load_registry_file(path)
    with pytest.raises(ValueError, match=r"models\.garbage\.path: .*not a TorchScript file"):
        f["garbage"]()
    with pytest.raises(ValueError, match=r"models\.dir-for-file\.path: .*must be a file"):
        f["dir-for-file"]()
    with pytest.raises(FileNotFoundError, match=r"models\.no-config\.path: .*no config\.json"):
        f["no-config"]()
    with pytest.raises(FileNotFoundError, match=r"models\.pickle-only\.path: .*no diffusion_pytorch_model"):
        f["pickle-only"]()
    with pytest.raises(ValueError, match=r"models\.file-for-dir\.path: .*must be a directory"):
        f["file-for-dir"]()
    with pytest.raises(ValueError, match=r"models\.wrong-return\.path: .*returned int"):
        f["wrong-return"]()
    with pytest.raises(ValueError, match=r"models\.no-module\.path: cannot import"):
        f["no-module"]()
    with pytest.raises(ValueError, match=r"models\.bad-json\.path: .*config\.json is not valid JSON"):
        f["bad-json"]()
    with pytest.raises(ValueError, match=r"models\.bad-ref\.reference: .*expected \[N >= 2, 1, 8, 8\]"):
        f["bad-ref"]()


def test_unconditional_network_refuses_class_label(tmp_path) -> None:
    torch.jit.save(torch.jit.script(_EpsNet()), str(tmp_path / "net.pt"))
    _save_unet(tmp_path / "u", _tiny_unet(), "epsilon")
    path = _write(tmp_path, """
        [models.u]
        kind = "diffusers-unet"
        path = "u"
        class_label = 1
    """)
    with pytest.raises(ValueError, match=r"models\.u\.class_label: the network is not class-conditional"):
        _load(path, "u")


def test_process_view_is_exact_at_equal_logsnr() -> None:
    from s3search.denoisers import Denoiser

    src = processes.get("vp-linear")
    seen = []
    d = Denoiser(fn=lambda x, t: (seen.append(t), x)[1], process=src)
    view = local.process_view(d, "edm")
    sigma = 1.7
    out = view(torch.ones(1, 2), sigma)
    t_src = seen[0]
    assert src.sigma_ve(t_src) == pytest.approx(sigma, rel=1e-10)
    torch.testing.assert_close(out, torch.full((1, 2), src.alpha(t_src), dtype=torch.float32))


# ----- the `s3search models` command (registered by the lead in s3search/cli/__init__.py) ---------------------
def test_models_cli_lists_and_checks_registry_models(tmp_path, entry_module, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from s3search.cli import models_cmd

    app = typer.Typer()
    models_cmd.register(app)
    path = _write(tmp_path, f"""
        [models.ok]
        kind = "entrypoint"
        path = "{entry_module}:make"
        shape = [2]
        [models.broken]
        kind = "torchscript"
        path = "missing.pt"
        process = "edm"
        prediction_type = "eps"
        shape = [2]
    """)
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    registry.clear_cache()
    try:
        runner = CliRunner()
        listed = runner.invoke(app, ["models", "list", "--json"])
        assert listed.exit_code == 0, listed.output
        rows = {r["name"]: r["source"] for r in json.loads(listed.output)}
        assert rows["ok"] == "registry file" and rows["broken"] == "registry file"
        good = runner.invoke(app, ["models", "check", "ok"])
        assert good.exit_code == 0 and json.loads(good.stdout)["shape"] == [2]
        bad = runner.invoke(app, ["models", "check", "ok", "broken"])
        assert bad.exit_code == 1 and "missing.pt does not exist" in bad.output
    finally:
        registry.clear_cache()
