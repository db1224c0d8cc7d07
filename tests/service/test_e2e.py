"""End to end over HTTP: a real uvicorn server, a real runner and the real search, on SQLite and PostgreSQL.

Submit a job on a built-in mixture, poll to completion, fetch trials and the schedule, run the exported JSON
through `sample`, and open the optuna-dashboard API for the job's study.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from .procs import cli, cli_env, cli_run, free_port, poll_job, stop, wait_http

JOB = {"model": "gmm-64d", "nfe": 4, "budget": 6, "n_samples": 64, "n_test_samples": 64, "method": "s3",
       "predictor": "ridge", "seed": 0}


@pytest.fixture()
def service(db_url, tmp_path):
    """serve + runner + dashboard on one database; yields (api client, key, dashboard url, env)."""
    env = cli_env(db_url, S3S_MAX_BUDGET="100")
    made = cli_run(["keys", "create", "e2e-user", "--label", "e2e"], env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    api_port, dash_port = free_port(), free_port()
    procs = [cli(["serve", "--port", str(api_port), "--log-level", "warning"], env, tmp_path / "api.log"),
             cli(["runner", "--heartbeat", "0.5", "--stale-after", "5"], env, tmp_path / "runner.log"),
             cli(["dashboard", "--port", str(dash_port)], env, tmp_path / "dashboard.log")]
    try:
        wait_http(f"http://127.0.0.1:{api_port}/readyz", proc=procs[0])
        wait_http(f"http://127.0.0.1:{dash_port}/api/studies", proc=procs[2])
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"X-API-Key": key}, timeout=30) as c:
            yield c, key, f"http://127.0.0.1:{dash_port}", env
    finally:
        for p in procs:
            stop(p)
        for name in ("api", "runner", "dashboard"):
            print(f"--- {name} log ---\n" + (tmp_path / f"{name}.log").read_text()[-3000:])


def test_submit_poll_fetch_sample_and_dashboard(service, tmp_path):
    client, key, dashboard, env = service
    r = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "e2e-1"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = poll_job(client, job_id, ("succeeded",))
    assert job["progress"]["evaluations"] == JOB["budget"]
    assert job["result"]["test_value"] is not None and job["result"]["baselines"]

    # The runner evaluated through the database's evaluation cache: every search evaluation is stored once.
    from sqlalchemy import func, select

    from studies.db import make_engine
    from studies.models import EvalCacheEntry
    engine = make_engine(env["DATABASE_URL"])
    with engine.connect() as conn:
        cached = conn.execute(select(func.count()).select_from(EvalCacheEntry)
                              .where(EvalCacheEntry.metric_key.like("%split=search"))).scalar_one()
    engine.dispose()
    assert cached == JOB["budget"]

    trials = client.get(f"/v1/jobs/{job_id}/trials", params={"limit": 50}).json()
    complete = [t for t in trials["items"] if t["state"] == "COMPLETE"]
    assert trials["total"] >= JOB["budget"] and len(complete) == JOB["budget"]
    assert all(t["nfe"] == 4 and t["schedule"] for t in complete)
    # The winner is chosen on the validation split among the best few, so its search-split value is one of the
    # trials' values, not necessarily the smallest.
    values = [t["value"] for t in complete]
    assert any(v == pytest.approx(job["result"]["best_value"]) for v in values)
    assert job["result"]["best_value"] >= min(values)

    # The exported JSON runs through `sample`, at the job's NFE, on the job's model.
    exported = cli_run(["export", job_id, "--server", str(client.base_url), "--key", key], env)
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    assert doc == client.get(f"/v1/jobs/{job_id}/schedule").json()
    from s3search.integrator import sample
    from s3search.models import registry
    from s3search.search.study import schedule_from_json

    schedule = schedule_from_json(json.dumps(doc))
    assert schedule.nfe == 4
    spec = registry.get("gmm-64d")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(16, *spec.shape, generator=g, dtype=torch.float64) * spec.process.sigma(schedule.timesteps[0]) \
        if hasattr(spec.process, "sigma") else torch.randn(16, *spec.shape, generator=g, dtype=torch.float64)
    if "sampler" in doc:
        from s3search.named import run_named
        x0 = run_named(spec.denoiser, x_T, schedule, generator=g)
    else:
        x0 = sample(spec.denoiser, x_T, schedule, generator=g)
    assert x0.shape == x_T.shape and torch.isfinite(x0).all()

    # The client commands against the same server.
    status = cli_run(["status", job_id, "--json", "--server", str(client.base_url), "--key", key], env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded", status.stderr
    sub = cli_run(["submit", "--model", "gmm-64d", "--nfe", "4,5", "--budget", "1000", "--samples", "8",
                   "--predictor", "ridge", "--server", str(client.base_url), "--key", key], env)
    assert sub.returncode == 2 and "budget" in sub.stderr        # over the budget limit: 422 naming the field
    sub = cli_run(["submit", "--model", "gmm-64d", "--nfe", "4-5", "--budget", "4", "--samples", "8",
                   "--test-samples", "8", "--predictor", "ridge", "--option", "batch_size=2",
                   "--server", str(client.base_url), "--key", key], env)
    assert sub.returncode == 0, sub.stderr
    second = client.get(f"/v1/jobs/{sub.stdout.strip()}").json()
    assert second["spec"]["nfe"] == [4, 5] and second["spec"]["options"]["batch_size"] == 2
    assert second["spec"]["metric"] == "fd"               # unset by the CLI: the model's default, set by the server
    client.post(f"/v1/jobs/{second['id']}/cancel")

    # The dashboard reads the same database: the job's study is there with its trials and note.
    studies = httpx.get(f"{dashboard}/api/studies", timeout=30).json()["study_summaries"]
    study = next(s for s in studies if s["study_name"] == job["study_name"])
    assert job["links"]["dashboard"].endswith(f"/dashboard/studies/{study['study_id']}")
    detail = httpx.get(f"{dashboard}/api/studies/{study['study_id']}", timeout=60).json()
    assert len([t for t in detail["trials"] if t["state"].lower() == "complete"]) == JOB["budget"]
    assert job_id in json.dumps(detail.get("note", {}))

    # The job's study plots as a CLI search does: `s3search plots` reads it from the service's database.
    plotted = cli_run(["plots", "--results", env["DATABASE_URL"], "--study", job["study_name"],
                       "--out", str(tmp_path / "plots")], env)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plots" / "metric_vs_nfe.png").is_file() and (tmp_path / "plots" / "best_so_far.png").is_file()

    # ... and over HTTP: the results file of a finished job, and a 409 while one has none.
    saved = cli_run(["results", job_id, "--out", str(tmp_path / "res"), "--server", str(client.base_url),
                     "--key", key], env)
    assert saved.returncode == 0, saved.stderr
    doc = json.loads((tmp_path / "res" / f"{job_id}.json").read_text())
    assert doc["model"] == "gmm-64d" and doc["runs"][0]["nfe"] == 4 and len(doc["runs"][0]["history"]) == JOB["budget"]
    assert doc["runs"][0]["value"] == pytest.approx(job["result"]["test_value"])
    assert client.get(f"/v1/jobs/{second['id']}/results").status_code == 409
    assert client.get(f"/v1/jobs/{'0' * 32}/results").status_code == 404
