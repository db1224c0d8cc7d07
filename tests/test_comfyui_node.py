"""The ComfyUI node package (s3search.integrations.comfyui): SIGMAS, the SAMPLER function, loaders, workflow.

ComfyUI itself is not installable here (not on PyPI, and CI has no network), so its side is played by
stand-ins written from reading ComfyUI's comfy/samplers.py, comfy/model_sampling.py and
comfy_extras/nodes_custom_sampler.py: `run_like_ksampler` follows KSAMPLER.sample's contract (noise_scaling at
sigmas[0], the sampler function called with the wrapped model, inverse_noise_scaling at sigmas[-1]) and the
EPS / CONST stand-ins carry those classes' two scaling formulas. docs/use-in-pipeline.md describes the manual
check inside a real ComfyUI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from s3search import baselines, grids, processes
from s3search.exports import export
from s3search.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from s3search.integrations.comfyui import loader as comfy_loader
from s3search.integrations.comfyui.loader import API_KEY_ENV, ScheduleSourceError, load_source
from s3search.integrations.comfyui.nodes import S3SearchSchedule
from s3search.integrations.comfyui.sampler import (frame_of, frame_of_sampling, sample_s3_schedule,
                                                   schedule_sigmas)
from s3search.integrations.k_diffusion import retime
from s3search.integrator import sample
from s3search.schedule import SolverSchedule, StepSpec
from gaussian_bed import MU, S2, denoiser
from reference_libs import k_diffusion_sampling

PACKAGE = Path(__file__).resolve().parents[1] / "s3search" / "integrations" / "comfyui"

MIXED_STEPS = (StepSpec(order=1), StepSpec(order=2, derivative="bh2", corrector="unic"),
               StepSpec(order=3, derivative="taylor", corrector="implicit"), StepSpec(order=2, derivative="dpmpp"),
               StepSpec(order=2, prediction="noise"), StepSpec(order=1))


# ----- the Gaussian test bed in the two frames a ComfyUI model can have ----------------------------------------
def ve_model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
    """k-diffusion convention: the exact denoiser of N(MU, diag(S2)) on the VE scale, sigma of shape [batch]."""
    assert sigma.shape == (x.shape[0],)
    s2 = sigma.to(x.dtype).reshape(-1, 1) ** 2
    return MU + S2 / (S2 + s2) * (x - MU)


def flow_model(x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
    """ComfyUI's flow (CONST) convention: x = (1 - t) x0 + t eps, sigma = t, returns the denoised x0."""
    assert t.shape == (x.shape[0],)
    a, s = (1.0 - t.to(x.dtype)).reshape(-1, 1), t.to(x.dtype).reshape(-1, 1)
    return MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)


def _noise(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, MU.shape[0]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----- stand-ins for ComfyUI's side ----------------------------------------------------------------------------
class EPS:
    """ComfyUI's EPS scaling: x = sigma * noise + latent; the output is kept as it is."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * (torch.sqrt(1.0 + sigma ** 2) if max_denoise else sigma) + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class CONST:
    """ComfyUI's flow scaling: x = t * noise + (1 - t) latent; the output is divided by 1 - sigmas[-1]."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class ModelSamplingFlux(torch.nn.Module, CONST):
    """ComfyUI composes a model's sampling from a schedule class and a scaling mixin, as here."""


class IMG_TO_IMG_FLOW(CONST):
    pass


class Patcher:
    """The part of ComfyUI's ModelPatcher the node and the sampler read."""

    def __init__(self, sampling: Any):
        self.sampling = sampling

    def get_model_object(self, name: str) -> Any:
        return {"model_sampling": self.sampling}[name]


class Guider:
    def __init__(self, patcher: Patcher):
        self.model_patcher = patcher


class WrappedModel:
    """KSamplerX0Inpaint's shape: inner_model is the guider; called as model(x, sigma, **extra_args)."""

    def __init__(self, fn, patcher: Patcher):
        self.fn, self.inner_model, self.seen = fn, Guider(patcher), []

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        self.seen.append(seed)
        return self.fn(x, sigma)


def run_like_ksampler(sampler_function, extra_options: dict, sampling: Any, fn, noise: torch.Tensor,
                      sigmas: torch.Tensor, latent: Optional[torch.Tensor] = None, seed: int = 7,
                      callback=None) -> torch.Tensor:
    latent = torch.zeros_like(noise) if latent is None else latent
    model = WrappedModel(fn, Patcher(sampling))
    x = sampling.noise_scaling(sigmas[0], noise, latent)
    extra_args = {"denoise_mask": None, "model_options": {}, "seed": seed}
    out = sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=True,
                           **extra_options)
    return sampling.inverse_noise_scaling(sigmas[-1], out)


@pytest.fixture
def fake_comfy(monkeypatch):
    """`comfy.samplers.KSAMPLER` as a record of what the node hands ComfyUI."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")

    class KSAMPLER:
        def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
            self.sampler_function, self.extra_options = sampler_function, dict(extra_options)

    samplers.KSAMPLER = KSAMPLER
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    return samplers


def _edm_schedule(final: str = "denoise") -> SolverSchedule:
    return SolverSchedule("edm", tuple(grids.edm(processes.get("edm"), 6)), MIXED_STEPS, final=final)


def _flow_schedule(final: str = "denoise") -> SolverSchedule:
    ts = grids.logsnr(processes.get("flow"), 6, t_start=processes.FLOW_T_TOP)
    return SolverSchedule("flow", tuple(ts), MIXED_STEPS, final=final)


def _write(tmp_path: Path, doc: Any, name: str = "schedule.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# ----- the package as ComfyUI loads it -------------------------------------------------------------------------
def test_package_exports_the_node_without_importing_comfy():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {"S3SearchSchedule"}
    assert NODE_CLASS_MAPPINGS["S3SearchSchedule"] is S3SearchSchedule
    assert "comfy" not in sys.modules


def test_loads_under_the_name_comfyui_gives_it():
    # ComfyUI execs custom_nodes/<folder>/__init__.py under a module name of its own; the absolute imports
    # must resolve to the installed s3search, not to the folder.
    spec = importlib.util.spec_from_file_location("custom_nodes_x_s3search_comfyui", PACKAGE / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS["S3SearchSchedule"] is S3SearchSchedule


def test_node_declares_comfyui_interface():
    types_ = S3SearchSchedule.INPUT_TYPES()
    assert list(types_["required"]) == ["source"] and types_["required"]["source"][0] == "STRING"
    assert types_["optional"]["api_key"][0] == "STRING" and types_["optional"]["model"][0] == "MODEL"
    assert S3SearchSchedule.RETURN_TYPES == ("SIGMAS", "SAMPLER")
    assert callable(getattr(S3SearchSchedule(), S3SearchSchedule.FUNCTION))
    assert isinstance(S3SearchSchedule.CATEGORY, str) and S3SearchSchedule.CATEGORY


def test_sampler_output_needs_comfy():
    with pytest.raises(ImportError, match="comfy.samplers"):
        from s3search.integrations.comfyui.sampler import comfy_sampler

        comfy_sampler(_edm_schedule())


# ----- the SAMPLER function through the k-diffusion convention ------------------------------------------------
def test_sampler_equals_sample_on_the_nodes_sigmas():
    sched = _edm_schedule()
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)  # what the node outputs
    x = _noise() * sched.timesteps[0]
    ours = sample_s3_schedule(ve_model, x, sigmas, schedule=sched)
    assert torch.equal(ours, sample(denoiser("edm"), x, sched))


@pytest.mark.parametrize("process", ["vp-discrete", "vp-linear"])
def test_sampler_equals_sample_on_vp_schedules(process):
    proc = processes.get(process)
    sched = SolverSchedule(process, tuple(grids.logsnr(proc, 6)), MIXED_STEPS)
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)
    x_ve = _noise() * proc.sigma_ve(sched.timesteps[0])
    ours = sample_s3_schedule(ve_model, x_ve, sigmas, schedule=sched)
    torch.testing.assert_close(ours, sample(denoiser(process), x_ve * proc.alpha(sched.timesteps[0]), sched),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,kd_fn", [("ddim", "sample_euler"), ("dpmpp_2m", "sample_dpmpp_2m"),
                                        ("dpmpp_3m", "sample_dpmpp_3m_sde")])
def test_equals_k_diffusions_own_sampler_for_that_sampler(name, kd_fn):
    ks = k_diffusion_sampling()
    ts = grids.edm(processes.get("edm"), 8)
    sched = baselines.get(name, timesteps=ts, process="edm")
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float64)
    x = _noise() * ts[0]
    kwargs = {"eta": 0.0} if "sde" in kd_fn else {}
    ref = getattr(ks, kd_fn)(ve_model, x.clone(), sigmas, disable=True, **kwargs)
    ours = sample_s3_schedule(ve_model, x, sigmas, schedule=sched)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_manual_check_offline_karras_grid_dpmpp_2m():
    # docs/use-in-pipeline.md's manual check, without ComfyUI: a dpmpp_2m schedule on KarrasScheduler's grid
    # (SD's sigma range, 20 steps) against k-diffusion's own sampler on k-diffusion's own float32 Karras sigmas.
    ks = k_diffusion_sampling()
    sigmas = ks.get_sigmas_karras(20, 0.0291675, 14.614642).to(torch.float64)
    ts = grids.edm(processes.get("edm"), 19, t_start=14.614642, t_end=0.0291675)
    sched = baselines.get("dpmpp_2m", timesteps=ts, process="edm")
    x = _noise() * float(sigmas[0])
    ref = ks.sample_dpmpp_2m(ve_model, x.clone(), sigmas, disable=True)
    torch.testing.assert_close(sample_s3_schedule(ve_model, x, sigmas, schedule=sched), ref, rtol=1e-6, atol=1e-6)


def test_named_schedule_runs():
    from s3search.named import NamedSchedule

    sched = NamedSchedule(sampler="ipndm", process="edm", timesteps=tuple(grids.edm(processes.get("edm"), 5)))
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)
    x = _noise() * sched.timesteps[0]
    assert torch.equal(sample_s3_schedule(ve_model, x, sigmas, schedule=sched), sample(denoiser("edm"), x, sched))


def test_other_sigmas_retime_the_schedule():
    sched = _edm_schedule()
    other = grids.logsnr(processes.get("edm"), 6)  # a ComfyUI scheduler node's grid, say
    sigmas = torch.tensor(list(other) + [0.0], dtype=torch.float64)
    x = _noise() * other[0]
    moved = retime(sched, sigmas)
    assert moved.timesteps != sched.timesteps
    torch.testing.assert_close(sample_s3_schedule(ve_model, x, sigmas, schedule=sched),
                               sample(denoiser("edm"), x, moved), rtol=1e-12, atol=1e-12)


def test_callback_reports_steps_for_comfyuis_progress_bar():
    sched = _edm_schedule()
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)
    seen = []
    sample_s3_schedule(ve_model, _noise() * sched.timesteps[0], sigmas, schedule=sched, callback=seen.append)
    steps = [d["i"] for d in seen]
    assert len(seen) == sched.nfe > len(sigmas) - 1  # correctors: more evaluations than steps
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == len(sigmas) - 2
    assert [d["evaluation"] for d in seen] == list(range(sched.nfe))
    assert all({"x", "denoised", "sigma"} <= set(d) for d in seen)


def test_stochastic_steps_follow_comfyuis_seed():
    sched = SolverSchedule("edm", tuple(grids.edm(processes.get("edm"), 4)),
                           (StepSpec(order=1, eta=1.0),) + (StepSpec(order=2, eta=0.5),) * 3)
    sigmas = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)
    x = _noise() * sched.timesteps[0]
    a, b, c = (sample_s3_schedule(ve_model, x, sigmas, {"seed": s}, schedule=sched) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a, sample(denoiser("edm"), x, sched, generator=torch.Generator().manual_seed(3)))


# ----- frames ---------------------------------------------------------------------------------------------------
def test_frame_comes_from_the_models_sampling():
    assert frame_of(ve_model) == "ve"
    assert frame_of(Patcher(EPS())) == "ve"
    assert frame_of(Patcher(ModelSamplingFlux())) == "flow"
    assert frame_of(WrappedModel(flow_model, Patcher(ModelSamplingFlux()))) == "flow"
    with pytest.raises(ValueError, match="image-to-image"):
        frame_of_sampling(IMG_TO_IMG_FLOW())


def test_flow_model_through_ksampler_contract_equals_sample(tmp_path, fake_comfy):
    sched = _flow_schedule()
    sigmas, sampler = S3SearchSchedule().load(str(_write(tmp_path, sched.to_dict())),
                                              model=Patcher(ModelSamplingFlux()))
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and float(sigmas.max()) <= 1.0
    noise = _noise()
    out = run_like_ksampler(sampler.sampler_function, sampler.extra_options, ModelSamplingFlux(), flow_model,
                            noise, sigmas)
    # KSAMPLER starts a flow model at x = 1.0 * noise: the state at t_top, which is where `sample` starts.
    torch.testing.assert_close(out, sample(denoiser("flow"), noise, sched), rtol=1e-9, atol=1e-9)


def test_ve_model_through_ksampler_contract_equals_sample(tmp_path, fake_comfy):
    sched = _edm_schedule()
    sigmas, sampler = S3SearchSchedule().load(str(_write(tmp_path, sched.to_dict())), model=Patcher(EPS()))
    assert sampler.extra_options["schedule"] == sched
    noise = _noise()
    out = run_like_ksampler(sampler.sampler_function, sampler.extra_options, EPS(), ve_model, noise, sigmas)
    assert torch.equal(out, sample(denoiser("edm"), noise * sigmas[0], sched))


def test_flow_sigmas_on_a_ve_model_are_refused():
    sched = _flow_schedule()
    flow_sigmas = torch.tensor(schedule_sigmas(sched, "flow"), dtype=torch.float32)
    with pytest.raises(ValueError, match="not a flow model"):
        sample_s3_schedule(ve_model, _noise(), flow_sigmas, schedule=sched)


def test_ve_sigmas_on_a_flow_model_are_refused():
    sched = _edm_schedule()
    model = WrappedModel(flow_model, Patcher(ModelSamplingFlux()))
    with pytest.raises(ValueError, match=r"sigmas\[0\]=80.0 is not a flow sigma"):
        sample_s3_schedule(model, _noise(), torch.tensor(schedule_sigmas(sched, "ve")), schedule=sched)


def test_a_ve_schedule_runs_on_a_flow_model_in_flow_sigmas(tmp_path, fake_comfy):
    sched = _edm_schedule()
    sigmas, sampler = S3SearchSchedule().load(str(_write(tmp_path, sched.to_dict())),
                                              model=Patcher(ModelSamplingFlux()))
    assert float(sigmas.max()) < 1.0
    noise = _noise()
    out = run_like_ksampler(sampler.sampler_function, sampler.extra_options, ModelSamplingFlux(), flow_model,
                            noise, sigmas)
    # One data distribution in two frames: the flow model's run equals the VE run from x_ve = x_flow / (1 - t0)
    # (to float32 rounding of the flow sigmas, which start the run at t0 * noise).
    torch.testing.assert_close(out, sample(denoiser("edm"), noise * sched.timesteps[0], sched),
                               rtol=1e-6, atol=1e-6)


# ----- final: none ----------------------------------------------------------------------------------------------
def test_final_none_sigmas_carry_the_schedules_own_end():
    none, denoise = _edm_schedule("none"), _edm_schedule("denoise")
    assert len(schedule_sigmas(none)) == len(none.timesteps) and schedule_sigmas(none)[-1] > 0.0
    assert schedule_sigmas(denoise)[-1] == 0.0 and len(schedule_sigmas(denoise)) == len(denoise.timesteps) + 1


def test_final_none_ignores_a_forced_trailing_zero_ve():
    sched = _edm_schedule("none")
    own = torch.tensor(schedule_sigmas(sched), dtype=torch.float32)
    forced = torch.cat([own, own.new_zeros(1)])  # what ComfyUI's sigma nodes end every grid with
    x = _noise() * sched.timesteps[0]
    ref = sample(denoiser("edm"), x, sched)
    assert torch.equal(sample_s3_schedule(ve_model, x, own, schedule=sched), ref)
    assert torch.equal(sample_s3_schedule(ve_model, x, forced, schedule=sched), ref)
    # It is the noisy state at the last sigma, not a denoised sample.
    assert not torch.allclose(ref, sample(denoiser("edm"), x, _edm_schedule("denoise")), atol=1e-6)


def test_final_none_on_a_flow_model_returns_x_over_alpha_either_way(tmp_path, fake_comfy):
    sched = _flow_schedule("none")
    sigmas, sampler = S3SearchSchedule().load(str(_write(tmp_path, sched.to_dict())),
                                              model=Patcher(ModelSamplingFlux()))
    assert float(sigmas[-1]) == pytest.approx(sched.timesteps[-1], rel=1e-6)
    noise = _noise()
    alpha_n = processes.get("flow").alpha(sched.timesteps[-1])
    ref = sample(denoiser("flow"), noise, sched) / alpha_n
    for grid in (sigmas, torch.cat([sigmas, sigmas.new_zeros(1)])):
        out = run_like_ksampler(sampler.sampler_function, sampler.extra_options, ModelSamplingFlux(), flow_model,
                                noise, grid)
        # KSAMPLER's 1 - sigmas[-1] is taken in the sigmas' float32: that rounding, 1e-7, is all that differs.
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)


def test_final_none_with_a_grid_of_the_wrong_length_is_refused():
    sched = _edm_schedule("none")
    grid = torch.tensor(schedule_sigmas(sched)[:-1] + [0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="final=none"):
        sample_s3_schedule(ve_model, _noise(), grid, schedule=sched)


def test_final_denoise_without_the_trailing_zero_is_refused():
    sched = _edm_schedule()
    with pytest.raises(ValueError, match="ending in 0.0"):
        sample_s3_schedule(ve_model, _noise(), torch.tensor(schedule_sigmas(sched)[:-1]), schedule=sched)


# ----- loaders ----------------------------------------------------------------------------------------------------
def test_file_loader_reads_native_and_export_documents(tmp_path):
    sched = _edm_schedule()
    assert load_source(str(_write(tmp_path, sched.to_dict()))) == sched
    exported = json.loads(json.dumps(export(sched, "comfyui")))
    assert load_source(str(_write(tmp_path, exported, "export.json"))) == sched


def test_data_mean_of_an_export_reaches_a_mean_x0_schedule(tmp_path, fake_comfy):
    import inspect

    from s3search.integrations.k_diffusion import sample_schedule

    if "data_mean" not in inspect.signature(sample_schedule).parameters:
        pytest.skip("sample_schedule takes no data_mean in this tree")
    sched = SolverSchedule("edm", tuple(grids.edm(processes.get("edm"), 6)), MIXED_STEPS, first_step="mean-x0")
    doc = {"format": "comfyui", "schedule": sched.to_dict(), "data_mean": MU.tolist()}
    sigmas, sampler = S3SearchSchedule().load(str(_write(tmp_path, doc)), model=Patcher(EPS()))
    assert sampler.extra_options["data_mean"] == MU.tolist()
    noise = _noise()
    out = run_like_ksampler(sampler.sampler_function, sampler.extra_options, EPS(), ve_model, noise, sigmas)
    torch.testing.assert_close(out, sample(denoiser("edm"), noise * sigmas[0], sched), rtol=1e-12, atol=1e-12)
    bad = dict(doc, data_mean=[1.0, float("nan")])
    with pytest.raises(ScheduleSourceError, match="mean.json.*data_mean must be finite"):
        load_source(str(_write(tmp_path, bad, "mean.json")))  # json writes the NaN, as JavaScript would not


def test_file_loader_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(ScheduleSourceError, match="missing.json.*does not exist"):
        load_source(str(tmp_path / "missing.json"))
    with pytest.raises(ScheduleSourceError, match="bad.json.*not valid JSON"):
        load_source(str(_write(tmp_path, "{not json", "bad.json")))
    doc = dict(_edm_schedule().to_dict(), final="sometimes")
    with pytest.raises(ScheduleSourceError, match="odd.json.*final"):
        load_source(str(_write(tmp_path, doc, "odd.json")))
    with pytest.raises(ScheduleSourceError, match="source is empty"):
        load_source("  ")


class _Service(BaseHTTPRequestHandler):
    """The one route of the service the node reads: GET /v1/jobs/{id}/schedule behind X-API-Key."""

    documents: dict[str, Any] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path == "/not-json":
            return self._answer(200, b"<html>a login page</html>", "text/html")
        if self.headers.get("X-API-Key") != "good-key":
            return self._json(401, {"detail": "a valid API key is required in the X-API-Key header"})
        if path not in self.documents:
            return self._json(404, {"detail": "job not found"})
        doc = self.documents[path]
        return self._json(200, doc if "format=comfyui" not in self.path else export(load_source_doc(doc), "comfyui"))

    def _json(self, code: int, doc: Any) -> None:
        self._answer(code, json.dumps(doc).encode(), "application/json")

    def _answer(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def load_source_doc(doc: dict) -> Any:
    return comfy_loader.schedule_from_document(doc, "test").schedule


@pytest.fixture
def service(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    sched = _edm_schedule()
    _Service.documents = {"/v1/jobs/j1/schedule": sched.to_dict()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sched
    finally:
        server.shutdown()
        server.server_close()


def test_url_loader_with_the_key(service, monkeypatch):
    base, sched = service
    url = f"{base}/v1/jobs/j1/schedule"
    assert load_source(url, "good-key") == sched
    assert load_source(url + "?format=comfyui", "good-key") == sched
    monkeypatch.setenv(API_KEY_ENV, "good-key")
    assert load_source(url) == sched


def test_url_loader_without_or_with_a_wrong_key(service):
    base, _ = service
    url = f"{base}/v1/jobs/j1/schedule"
    with pytest.raises(ScheduleSourceError, match=f"HTTP 401, an API key is required.*{API_KEY_ENV}"):
        load_source(url)
    with pytest.raises(ScheduleSourceError, match="HTTP 401, the API key was refused") as err:
        load_source(url, "wrong-key")
    assert "wrong-key" not in str(err.value)


def test_url_loader_errors(service):
    base, _ = service
    with pytest.raises(ScheduleSourceError, match="HTTP 404 \\(job not found\\)"):
        load_source(f"{base}/v1/jobs/nope/schedule", "good-key")
    with pytest.raises(ScheduleSourceError, match="not-json: not valid JSON"):
        load_source(f"{base}/not-json", "good-key")
    import socket

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ScheduleSourceError, match="could not connect"):
        comfy_loader.fetch_schedule(f"http://127.0.0.1:{port}/v1/jobs/j1/schedule", "k", timeout=2.0)


def test_url_loader_times_out(monkeypatch):
    # A server that accepts and never answers: the timeout must end the wait with a clear message.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/jobs/j1/schedule"
        with pytest.raises(ScheduleSourceError, match="no answer within 0.3 s"):
            comfy_loader.fetch_schedule(url, "k", timeout=0.3)
    finally:
        listener.close()


def test_node_loads_from_the_service(service, fake_comfy):
    base, sched = service
    sigmas, sampler = S3SearchSchedule().load(f"{base}/v1/jobs/j1/schedule", "good-key")
    assert sampler.extra_options == {"schedule": sched}
    assert sampler.sampler_function is sample_s3_schedule
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == pytest.approx(schedule_sigmas(sched), rel=1e-6)


def test_is_changed_refetches_urls_and_watches_files(tmp_path):
    assert math.isnan(S3SearchSchedule.IS_CHANGED(source="http://host/v1/jobs/j/schedule"))
    path = _write(tmp_path, _edm_schedule().to_dict())
    before = S3SearchSchedule.IS_CHANGED(source=str(path))
    assert before == S3SearchSchedule.IS_CHANGED(source=str(path), api_key="", model=None)
    path.write_text(json.dumps(_edm_schedule("none").to_dict()))
    assert S3SearchSchedule.IS_CHANGED(source=str(path)) != before


# ----- the example workflow ---------------------------------------------------------------------------------------
# Node types and their slots as defined in ComfyUI's nodes.py and comfy_extras/nodes_custom_sampler.py.
COMFY_NODES = {
    "CheckpointLoaderSimple": ([], ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": (["CLIP"], ["CONDITIONING"]),
    "EmptyLatentImage": ([], ["LATENT"]),
    "SamplerCustom": (["MODEL", "CONDITIONING", "CONDITIONING", "SAMPLER", "SIGMAS", "LATENT"], ["LATENT", "LATENT"]),
    "VAEDecode": (["LATENT", "VAE"], ["IMAGE"]),
    "SaveImage": (["IMAGE"], []),
    "S3SearchSchedule": (["MODEL"], list(S3SearchSchedule.RETURN_TYPES)),
}


def test_example_workflow_is_a_consistent_comfyui_graph():
    wf = json.loads((PACKAGE / "example_workflow.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert {n["type"] for n in nodes.values()} <= set(COMFY_NODES)
    assert set(NODE_CLASS_MAPPINGS) <= {n["type"] for n in nodes.values()}
    for n in nodes.values():
        ins, outs = COMFY_NODES[n["type"]]
        assert [i["type"] for i in n["inputs"]] == ins, n["type"]
        assert [o["type"] for o in n["outputs"]] == outs, n["type"]
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert wf["last_node_id"] == max(nodes)
    ours = next(n for n in nodes.values() if n["type"] == "S3SearchSchedule")
    widgets = S3SearchSchedule.INPUT_TYPES()
    n_widgets = sum(1 for group in widgets.values() for spec in group.values() if spec[0] == "STRING")
    assert len(ours["widgets_values"]) == n_widgets
    sampler_custom = next(n for n in nodes.values() if n["type"] == "SamplerCustom")
    feeds = {(link[3], link[4]): link[1] for link in wf["links"]}
    assert feeds[(sampler_custom["id"], 3)] == feeds[(sampler_custom["id"], 4)] == ours["id"]


def test_example_workflow_ships_as_package_data():
    import fnmatch
    import tomllib

    setuptools_cfg = tomllib.loads((PACKAGE.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("s3search.integrations.comfyui", pattern)
               for pattern in setuptools_cfg["packages"]["find"]["include"])
    patterns = setuptools_cfg["package-data"].get("*", []) + setuptools_cfg["package-data"].get(
        "s3search.integrations.comfyui", [])
    assert any(fnmatch.fnmatch("example_workflow.json", pattern) for pattern in patterns)
