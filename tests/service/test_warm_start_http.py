"""Warm start over HTTP, against a real uvicorn server and a real runner on SQLite and PostgreSQL: a job names
its owner's earlier jobs and a predictor saved on the server, by name; another owner's job, an unknown job or
predictor, a study name, a storage URL and a path are refused naming their field, and write nothing; an
accepted warm-started job runs to completion and records the warm pairs it used."""

from __future__ import annotations

import httpx
import numpy as np
import optuna
import pytest

from .procs import cli, cli_env, cli_run, free_port, poll_job, stop, wait_http

JOB = {"model": "gmm-64d", "nfe": 4, "budget": 8, "n_samples": 32, "n_test_samples": 32, "method": "s3",
       "predictor": "ridge", "seed": 0}


def _save_predictor(folder) -> None:
    """A ridge predictor fitted on random schedules of the model's space (any ranking will do here)."""
    import predictors
    from s3search.models import registry
    from s3search.space import SearchSpace

    space = SearchSpace(registry.get("gmm-64d").process, (4, 5))
    rng = np.random.default_rng(0)
    scheds = [space.random(rng) for _ in range(24)]
    predictors.get("ridge").fit(scheds, rng.random(24).tolist()).save(folder / "gauss")


def _key(env: dict, owner: str) -> str:
    made = cli_run(["keys", "create", owner], env)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture()
def service(db_url, tmp_path):
    """serve + runner with a folder of saved predictors; yields (alice's client, bob's client, database URL)."""
    _save_predictor(tmp_path / "predictors")
    env = cli_env(db_url, S3S_MAX_BUDGET="100", S3S_PREDICTORS_DIR=str(tmp_path / "predictors"))
    alice, bob = _key(env, "alice"), _key(env, "bob")
    port = free_port()
    procs = [cli(["serve", "--port", str(port), "--log-level", "warning"], env, tmp_path / "api.log"),
             cli(["runner", "--heartbeat", "0.5", "--stale-after", "5"], env, tmp_path / "runner.log")]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", proc=procs[0])
        with httpx.Client(base_url=base, headers={"X-API-Key": alice}, timeout=30) as a, \
                httpx.Client(base_url=base, headers={"X-API-Key": bob}, timeout=30) as b:
            yield a, b, db_url
    finally:
        for p in procs:
            stop(p)
        for name in ("api", "runner"):
            print(f"--- {name} log ---\n" + (tmp_path / f"{name}.log").read_text()[-3000:])


def _fields(r: httpx.Response) -> list[str]:
    return [e["field"] for e in r.json().get("errors", [])]


def test_a_warm_started_job_runs_from_its_owners_job_and_a_saved_predictor(service):
    alice, _, db_url = service
    assert alice.get("/v1/predictors").json() == {"predictors": ["gauss"]}
    first = alice.post("/v1/jobs", json=JOB)
    assert first.status_code == 202, first.text
    done = poll_job(alice, first.json()["id"], ("succeeded",))
    warm = {"jobs": [done["id"]], "predictor": "gauss"}
    r = alice.post("/v1/jobs", json={**JOB, "nfe": 5, "options": {"warm_start": warm}})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["options"]["warm_start"] == warm          # what was asked, not what it resolved to
    job = poll_job(alice, r.json()["id"], ("succeeded",))
    assert job["progress"]["evaluations"] == JOB["budget"]
    attrs = optuna.load_study(study_name=job["study_name"], storage=db_url).user_attrs
    assert attrs["warm_start_pairs"] > 0 and attrs["warm_start_predicted"] > 0


def test_warm_starts_a_request_may_not_name_are_refused_naming_the_field(service):
    alice, bob, _ = service
    mine = alice.post("/v1/jobs", json=JOB)
    assert mine.status_code == 202, mine.text
    theirs = bob.post("/v1/jobs", json={**JOB, "options": {"warm_start": {"jobs": [mine.json()["id"]]}}})
    unknown = bob.post("/v1/jobs", json={**JOB, "options": {"warm_start": {"jobs": ["0" * 32]}}})
    # Another owner's job reads exactly as a missing one: nobody learns of others' jobs.
    assert theirs.status_code == unknown.status_code == 404
    assert _fields(theirs) == _fields(unknown) == ["options.warm_start.jobs[0]"]
    assert theirs.text.replace(mine.json()["id"], "ID") == unknown.text.replace("0" * 32, "ID")
    r = bob.post("/v1/jobs", json={**JOB, "options": {"warm_start": {"predictor": "nope"}}})
    assert r.status_code == 404 and _fields(r) == ["options.warm_start.predictor"], r.text
    for warm, field in [({"studies": ["x"]}, "options.warm_start.studies"),
                        ({"storage": "sqlite:////tmp/x.db"}, "options.warm_start.storage"),
                        ({"predictor_path": "/tmp/p"}, "options.warm_start.predictor_path"),
                        ({"predictor": "../gauss"}, "options.warm_start.predictor"),
                        ({"jobs": ["../x"]}, "options.warm_start.jobs[0]"),
                        ({"jobs": "x"}, "options.warm_start.jobs")]:
        r = bob.post("/v1/jobs", json={**JOB, "options": {"warm_start": warm}})
        assert r.status_code == 422 and field in _fields(r), (warm, r.text)
    assert bob.get("/v1/jobs").json()["total"] == 0                    # nothing half-written
