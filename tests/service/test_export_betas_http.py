"""GET /v1/jobs/{id}/schedule over HTTP, against a real uvicorn process: the `betas` query parameter names the
model's betas for the diffusers timesteps (a bad value is a 422 naming `betas`), a job on a diffusers pipeline
folder defaults to that folder's own betas, a mean-x0 winner's export carries the model's data mean, and a job
accepts `options.target`."""

from __future__ import annotations

import json

import httpx
import pytest

from s3search import baselines, exports
from s3search.schedule import SolverSchedule, StepSpec

from .procs import report_best, serving

GOOD = {"nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}


@pytest.fixture()
def server(db_url, tmp_path):
    with serving(db_url, tmp_path, "betas-user") as (base, key):
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=120) as c:
            yield c


def _job_with_best(client: httpx.Client, db_url: str, model: str, best: dict, **body) -> tuple[str, dict]:
    """A submitted job (id, public document) whose runner reported `best` as its best schedule so far."""
    r = client.post("/v1/jobs", json={**GOOD, "model": model, **body})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    report_best(db_url, job_id, best)
    return job_id, r.json()


def _export(client: httpx.Client, job_id: str, query: str) -> httpx.Response:
    return client.get(f"/v1/jobs/{job_id}/schedule?{query}")


def test_betas_name_the_diffusers_timesteps_and_a_bad_value_is_a_422_naming_betas(server, db_url):
    schedule = baselines.for_nfe("dpmpp_2m", 5, "edm")
    job_id, _ = _job_with_best(server, db_url, "gmm-64d", schedule.to_dict())
    scaled = _export(server, job_id, "format=diffusers&betas=scaled_linear")
    assert scaled.status_code == 200, scaled.text
    assert scaled.json()["timesteps"] == exports.export(schedule, "diffusers", betas="scaled_linear")["timesteps"]
    assert scaled.json()["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    # gmm-64d is no diffusers folder: without betas the exporter's default (the DDPM betas), and it says so.
    plain = _export(server, job_id, "format=diffusers").json()
    assert plain["timesteps"] == exports.export(schedule, "diffusers")["timesteps"] != scaled.json()["timesteps"]
    assert any("no betas given" in n for n in plain["notes"])
    for query in ("format=diffusers&betas=cosine", "format=diffusers&betas=model", "format=comfyui&betas=x"):
        r = _export(server, job_id, query)
        assert r.status_code == 422, (query, r.text)
        assert [e["field"] for e in r.json()["errors"]] == ["betas"], (query, r.text)


def test_a_job_on_a_pipeline_folder_defaults_to_its_own_betas_and_target(server, db_url):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from s3search.models.digits_t2i import SD_FOLDER

    own = json.loads((SD_FOLDER / "scheduler" / "scheduler_config.json").read_text())
    schedule = baselines.for_nfe("ddim", 5, "edm")
    job_id, public = _job_with_best(server, db_url, "digits-t2i", schedule.to_dict())
    assert public["spec"]["options"]["target"] == "diffusers"        # a pipeline folder's default
    assert public["spec"]["options"]["space"]["first_steps"] == ["model"]
    doc = _export(server, job_id, "format=diffusers").json()
    assert doc["timesteps"] == exports.export(schedule, "diffusers", betas=own)["timesteps"]
    assert doc["timesteps"] != exports.export(schedule, "diffusers")["timesteps"]   # not the DDPM default
    assert doc["scheduler"]["config"]["beta_schedule"] == "scaled_linear"
    assert _export(server, job_id, "format=diffusers&betas=model").json()["timesteps"] == doc["timesteps"]
    linear = _export(server, job_id, "format=diffusers&betas=linear").json()
    assert linear["timesteps"] == exports.export(schedule, "diffusers", betas="linear")["timesteps"]


def test_a_mean_x0_winner_exports_with_the_models_data_mean_and_a_job_takes_options_target(server, db_url):
    from s3search.models import registry

    schedule = SolverSchedule("edm", (80.0, 10.0, 2.0, 0.5, 0.1, 0.002),
                              tuple(StepSpec(order=min(i + 1, 2)) for i in range(5)), first_step="mean-x0")
    job_id, public = _job_with_best(server, db_url, "gmm-64d", schedule.to_dict(),
                                    options={"target": "k-diffusion"})
    assert public["spec"]["options"]["target"] == "k-diffusion"
    mean = registry.get("gmm-64d").denoiser.data_mean.tolist()
    for fmt in ("k-diffusion", "comfyui"):
        doc = _export(server, job_id, f"format={fmt}").json()
        assert doc["data_mean"] == pytest.approx(mean), fmt
    assert _export(server, job_id, "format=diffusers").json()["scheduler"]["config"]["data_mean"] == \
        pytest.approx(mean)
    assert "data_mean" not in _export(server, job_id, "format=json").json()


def test_betas_model_reads_a_registry_file_entry_relative_to_the_file_without_loading_weights(tmp_path,
                                                                                                 monkeypatch):
    from api.routes.jobs import _model_scheduler_config
    from s3search.models import registry

    (tmp_path / "ddpm" / "scheduler").mkdir(parents=True)     # no weights at all: none are read
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "num_train_timesteps": 1000}
    (tmp_path / "ddpm" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    (tmp_path / "flow" / "scheduler").mkdir(parents=True)
    (tmp_path / "flow" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
    (tmp_path / "models.toml").write_text('[models.my-ddpm]\nkind = "diffusers-unet"\npath = "ddpm"\n\n'
                                          '[models.my-flow]\nkind = "diffusers-unet"\npath = "flow"\n')
    monkeypatch.setenv(registry.ENV_REGISTRY, str(tmp_path / "models.toml"))
    assert _model_scheduler_config("my-ddpm") == config
    assert _model_scheduler_config("my-flow") is None           # a flow-matching scheduler has no betas
    assert _model_scheduler_config("gmm-64d") is None
