"""The REST API in-process (TestClient) on SQLite and PostgreSQL: jobs, idempotency, auth, trials, schedules."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api import Settings, create_app
from studies.runner import Runner, RunnerOptions
from studies.keys import create_key

from .fakes import candidate, fake_search

GOOD = {"model": "gmm-64d", "nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}


@pytest.fixture()
def app(db_url):
    return create_app(Settings(database_url=db_url, dashboard_url="http://dash.example:8080",
                               max_budget=100, max_samples=1000, max_request_bytes=4096, max_page_size=50))


@pytest.fixture()
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture()
def keys(app):
    with app.state.sessions() as s:
        return {"alice": create_key(s, "alice")[1], "bob": create_key(s, "bob")[1]}


def h(key: str, **extra: str) -> dict[str, str]:
    return {"X-API-Key": key, **extra}


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_auth_is_required_and_jobs_are_private(client, keys):
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers=h("s3s_000000000000_" + "x" * 40)).status_code == 401
    r = client.post("/v1/jobs", json=GOOD, headers=h(keys["alice"]))
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=h(keys["bob"])).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h(keys["bob"])).status_code == 404
    assert client.get("/v1/jobs", headers=h(keys["bob"])).json()["total"] == 0
    bearer = {"Authorization": f"Bearer {keys['alice']}"}
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer).status_code == 200


def test_submit_read_list_and_cancel(client, keys):
    r = client.post("/v1/jobs", json={**GOOD, "nfe": {"min": 4, "max": 6}}, headers=h(keys["alice"]))
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['id']}" == body["links"]["self"]
    assert body["status"] == "queued" and body["spec"]["nfe"] == [4, 5, 6] and body["spec"]["metric"] == "fd"
    assert body["progress"] == {"evaluations": 0, "budget": 3, "fraction": 0.0, "message": "queued",
                                "predictor_tau": None}
    got = client.get(r.headers["location"], headers=h(keys["alice"])).json()
    assert got["id"] == body["id"] and got["status"] == "queued"
    client.post("/v1/jobs", json={**GOOD, "seed": 1}, headers=h(keys["alice"]))
    page = client.get("/v1/jobs?limit=1", headers=h(keys["alice"])).json()
    assert page["total"] == 2 and len(page["items"]) == 1
    c = client.post(f"/v1/jobs/{body['id']}/cancel", headers=h(keys["alice"]))
    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert client.get("/v1/jobs?status=cancelled", headers=h(keys["alice"])).json()["total"] == 1
    assert client.get(f"/v1/jobs/{body['id']}/schedule", headers=h(keys["alice"])).status_code == 404


def test_idempotency_key(client, keys):
    hdr = h(keys["alice"], **{"Idempotency-Key": "abc-123"})
    a = client.post("/v1/jobs", json=GOOD, headers=hdr)
    b = client.post("/v1/jobs", json=dict(reversed(list(GOOD.items()))), headers=hdr)   # same body, other order
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    assert b.headers["idempotent-replayed"] == "true" and b.headers["location"] == a.headers["location"]
    c = client.post("/v1/jobs", json={**GOOD, "seed": 7}, headers=hdr)
    assert c.status_code == 409 and c.json()["errors"][0]["field"] == "Idempotency-Key"
    d = client.post("/v1/jobs", json=GOOD, headers=h(keys["bob"], **{"Idempotency-Key": "abc-123"}))
    assert d.status_code == 202 and d.json()["id"] != a.json()["id"]          # keys are per owner


def test_unknown_model_is_404_listing_known_models(client, keys):
    r = client.post("/v1/jobs", json={**GOOD, "model": "no-such-model"}, headers=h(keys["alice"]))
    assert r.status_code == 404
    assert "gmm-64d" in r.json()["known"] and "gmm-64d" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "model"


def test_catalog(client, keys):
    models = client.get("/v1/models", headers=h(keys["alice"])).json()["models"]
    assert "gmm-64d" in models
    from s3search import baselines
    assert client.get("/v1/baselines", headers=h(keys["alice"])).json()["baselines"] == sorted(baselines.names())
    assert baselines.names()
    opts = client.get("/v1/options", headers=h(keys["alice"])).json()
    assert opts["limits"]["max_budget"] == 100 and "s3" in opts["methods"]


def test_trials_and_schedule_after_a_run(app, client, keys, db_url):
    r = client.post("/v1/jobs", json={**GOOD, "budget": 7}, headers=h(keys["alice"]))
    job_id = r.json()["id"]
    runner = Runner(db_url, options=RunnerOptions(heartbeat_interval_s=0.5), search_fn=fake_search)
    try:
        assert runner.run_once() == job_id
    finally:
        runner.close()
    job = client.get(f"/v1/jobs/{job_id}", headers=h(keys["alice"])).json()
    assert job["status"] == "succeeded" and job["progress"]["fraction"] == 1.0
    assert job["result"]["baselines"] == {"ddim": 3.0, "dpmpp-2m": 2.5}
    assert job["links"]["dashboard"].startswith("http://dash.example:8080/dashboard/studies/")
    first = client.get(f"/v1/jobs/{job_id}/trials?limit=5", headers=h(keys["alice"])).json()
    assert first["total"] == 7 and len(first["items"]) == 5 and first["next"]
    rest = client.get(first["next"], headers=h(keys["alice"])).json()
    assert len(rest["items"]) == 2 and rest["next"] is None
    t = first["items"][0]
    assert t["state"] == "COMPLETE" and t["nfe"] == 5 and t["schedule"] == candidate(5, 0).to_dict()
    assert t["predicted_score"] == pytest.approx(t["value"] + 0.1)
    fails = client.get(f"/v1/jobs/{job_id}/trials?state=FAIL", headers=h(keys["alice"]))
    assert fails.status_code == 200, fails.text
    assert fails.json()["total"] == 0
    sched = client.get(f"/v1/jobs/{job_id}/schedule", headers=h(keys["alice"]))
    assert sched.status_code == 200 and sched.json() == candidate(5, 6).to_dict()
    assert sched.headers["x-job-status"] == "succeeded"
    from s3search import exports
    for fmt in ("diffusers", "k-diffusion", "comfyui"):
        other = client.get(f"/v1/jobs/{job_id}/schedule?format={fmt}", headers=h(keys["alice"]))
        assert other.status_code == 200, other.text
        assert other.json() == json.loads(json.dumps(exports.export(candidate(5, 6), fmt)))
    with app.state.sessions() as s:       # each export is recorded once per (job, format, schedule)
        from sqlalchemy import func, select
        from studies.models import Export
        assert s.scalar(select(func.count()).select_from(Export).where(Export.job_id == job_id)) == 3
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h(keys["alice"])).status_code == 409


def test_revoked_key_stops_working_once_the_cache_expires(db_url):
    from studies.keys import revoke_key

    app = create_app(Settings(database_url=db_url, key_cache_ttl_s=0.5))
    with app.state.sessions() as s:
        row, key = create_key(s, "carol")
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers=h(key)).status_code == 200
        with app.state.sessions() as s:
            assert revoke_key(s, row.id)
        import time
        time.sleep(0.6)
        assert client.get("/v1/jobs", headers=h(key)).status_code == 401
    nocache = create_app(Settings(database_url=db_url, key_cache_ttl_s=0))
    with app.state.sessions() as s:
        row2, key2 = create_key(s, "carol")
    with TestClient(nocache) as client:
        assert client.get("/v1/jobs", headers=h(key2)).status_code == 200
        with nocache.state.sessions() as s:
            revoke_key(s, row2.id)
        assert client.get("/v1/jobs", headers=h(key2)).status_code == 401


def test_trial_pages_agree_with_optunas_public_api(db_url):
    import optuna
    from optuna.trial import TrialState, create_trial

    from api.routes.jobs import page_of_trials
    from studies.optuna_storage import optuna_storage

    storage = optuna_storage(db_url)
    study = optuna.create_study(study_name="paging", storage=storage)
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED] * 4
    study.add_trials([create_trial(state=st, value=float(i) if st == TrialState.COMPLETE else None,
                                   user_attrs={"i": i}) for i, st in enumerate(states)])
    sid = storage.get_study_id_from_name("paging")
    for state in (None, "COMPLETE", "FAIL"):
        every = storage.get_all_trials(sid, states=(TrialState[state],) if state else None)
        for offset in (0, 3, 7, 15, 40):
            total, page = page_of_trials(storage, sid, state, 4, offset)
            assert total == len(every)
            assert [t.number for t in page] == [t.number for t in every[offset:offset + 4]]
            assert [t.user_attrs for t in page] == [t.user_attrs for t in every[offset:offset + 4]]
    storage.engine.dispose()
