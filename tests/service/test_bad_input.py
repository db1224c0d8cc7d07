"""A table of malformed requests: each gets its status and names its field; none writes a job."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api import Settings, create_app
from studies import jobs as repo
from studies.keys import create_key

GOOD = {"model": "gmm-64d", "nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}
MISSING_JOB = "0" * 32


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


# (id, method, path, body: dict | str | None, extra headers, expected status, expected field or None)
CASES = [
    ("missing model", "POST", "/v1/jobs", without("model"), {}, 422, "model"),
    ("model not a string", "POST", "/v1/jobs", {**GOOD, "model": 3}, {}, 422, "model"),
    ("model with a path", "POST", "/v1/jobs", {**GOOD, "model": "../etc/passwd"}, {}, 422, "model"),
    ("unknown model", "POST", "/v1/jobs", {**GOOD, "model": "sd-xl"}, {}, 404, "model"),
    ("missing nfe", "POST", "/v1/jobs", without("nfe"), {}, 422, "nfe"),
    ("nfe as string", "POST", "/v1/jobs", {**GOOD, "nfe": "5"}, {}, 422, "nfe"),
    ("nfe zero", "POST", "/v1/jobs", {**GOOD, "nfe": 0}, {}, 422, "nfe"),
    ("nfe too large", "POST", "/v1/jobs", {**GOOD, "nfe": 1000}, {}, 422, "nfe"),
    ("nfe empty list", "POST", "/v1/jobs", {**GOOD, "nfe": []}, {}, 422, "nfe"),
    ("nfe too many values", "POST", "/v1/jobs", {**GOOD, "nfe": {"min": 2, "max": 20}}, {}, 422, "nfe"),
    ("nfe range enormous", "POST", "/v1/jobs", {**GOOD, "nfe": {"min": 2, "max": 10**15}}, {}, 422, "nfe"),
    ("nfe range reversed", "POST", "/v1/jobs", {**GOOD, "nfe": {"min": 8, "max": 4}}, {}, 422, "nfe.max"),
    ("nfe range unknown key", "POST", "/v1/jobs", {**GOOD, "nfe": {"min": 4, "max": 6, "step": 2}}, {}, 422,
     "nfe.step"),
    ("budget zero", "POST", "/v1/jobs", {**GOOD, "budget": 0}, {}, 422, "budget"),
    ("budget over limit", "POST", "/v1/jobs", {**GOOD, "budget": 10_000}, {}, 422, "budget"),
    ("budget boolean", "POST", "/v1/jobs", {**GOOD, "budget": True}, {}, 422, "budget"),
    ("budget fractional", "POST", "/v1/jobs", {**GOOD, "budget": 3.5}, {}, 422, "budget"),
    ("n_samples negative", "POST", "/v1/jobs", {**GOOD, "n_samples": -1}, {}, 422, "n_samples"),
    ("n_samples over limit", "POST", "/v1/jobs", {**GOOD, "n_samples": 10**7}, {}, 422, "n_samples"),
    ("n_test_samples string", "POST", "/v1/jobs", {**GOOD, "n_test_samples": "many"}, {}, 422, "n_test_samples"),
    ("unknown method", "POST", "/v1/jobs", {**GOOD, "method": "annealing"}, {}, 422, "method"),
    ("unknown predictor", "POST", "/v1/jobs", {**GOOD, "predictor": "xgboost"}, {}, 422, "predictor"),
    ("empty metric", "POST", "/v1/jobs", {**GOOD, "metric": ""}, {}, 422, "metric"),
    ("seed negative", "POST", "/v1/jobs", {**GOOD, "seed": -5}, {}, 422, "seed"),
    ("seed too large", "POST", "/v1/jobs", {**GOOD, "seed": 2**40}, {}, 422, "seed"),
    ("unknown field", "POST", "/v1/jobs", {**GOOD, "gpu": 1}, {}, 422, "gpu"),
    ("unknown search option", "POST", "/v1/jobs", {**GOOD, "options": {"x": {"y": 1}}}, {}, 422, "options.x"),
    ("niche factor below one", "POST", "/v1/jobs", {**GOOD, "options": {"niche_within": 0.5}}, {}, 422,
     "options.niche_within"),
    ("refine share of one", "POST", "/v1/jobs", {**GOOD, "options": {"refine_share": 1.0}}, {}, 422,
     "options.refine_share"),
    ("refine step size zero", "POST", "/v1/jobs", {**GOOD, "options": {"refine_sigma": 0}}, {}, 422,
     "options.refine_sigma"),
    ("refine method unknown", "POST", "/v1/jobs", {**GOOD, "options": {"refine_method": "adam"}}, {}, 422,
     "options.refine_method"),
    ("refine arms fractional", "POST", "/v1/jobs", {**GOOD, "options": {"refine_arms": 1.5}}, {}, 422,
     "options.refine_arms"),
    ("server-only option", "POST", "/v1/jobs", {**GOOD, "options": {"evaluator": {"device": "cuda"}}}, {}, 422,
     "options.evaluator"),
    ("options NaN", "POST", "/v1/jobs", json.dumps(GOOD)[:-1] + ', "options": {"batch_size": NaN}}', {}, 422,
     "options.batch_size"),
    ("budget below one per NFE", "POST", "/v1/jobs", {**GOOD, "nfe": [4, 5, 6], "budget": 2}, {}, 422, "budget"),
    ("options bad key", "POST", "/v1/jobs", {**GOOD, "options": {"bad key!": 1}}, {}, 422, "options.bad key!"),
    ("body not JSON", "POST", "/v1/jobs", "{model: gmm", {}, 422, "body"),
    ("body nested too deep", "POST", "/v1/jobs", json.dumps(GOOD)[:-1] + ', "options": {"space": '
     + "[" * 1800 + "]" * 1800 + "}}", {}, 422, "body"),
    ("body a list", "POST", "/v1/jobs", [GOOD], {}, 422, "body"),
    ("body empty", "POST", "/v1/jobs", "", {}, 422, "body"),
    ("body too large", "POST", "/v1/jobs", {**GOOD, "options": {"pad": "x" * 900} | {f"k{i}": "y" * 900
                                                                                     for i in range(8)}},
     {}, 413, None),
    ("idempotency key too long", "POST", "/v1/jobs", GOOD, {"Idempotency-Key": "k" * 300}, 422, "Idempotency-Key"),
    ("idempotency key with spaces", "POST", "/v1/jobs", GOOD, {"Idempotency-Key": "a b"}, 422, "Idempotency-Key"),
    ("no API key", "POST", "/v1/jobs", GOOD, {"X-API-Key": ""}, 401, None),
    ("list limit zero", "GET", "/v1/jobs?limit=0", None, {}, 422, "limit"),
    ("list limit not a number", "GET", "/v1/jobs?limit=ten", None, {}, 422, "limit"),
    ("list limit over page size", "GET", "/v1/jobs?limit=5000", None, {}, 422, "limit"),
    ("list offset negative", "GET", "/v1/jobs?offset=-1", None, {}, 422, "offset"),
    ("list unknown status", "GET", "/v1/jobs?status=done", None, {}, 422, "status"),
    ("job id not hex", "GET", "/v1/jobs/not-a-job", None, {}, 422, "job_id"),
    ("job id unknown", "GET", f"/v1/jobs/{MISSING_JOB}", None, {}, 404, None),
    ("cancel unknown job", "POST", f"/v1/jobs/{MISSING_JOB}/cancel", None, {}, 404, None),
    ("schedule unknown format", "GET", f"/v1/jobs/{MISSING_JOB}/schedule?format=png", None, {}, 422, "format"),
    ("trials unknown state", "GET", f"/v1/jobs/{MISSING_JOB}/trials?state=DONE", None, {}, 422, "state"),
]


@pytest.fixture()
def setup(db_url):
    app = create_app(Settings(database_url=db_url, max_budget=100, max_samples=1000, max_request_bytes=4096,
                              max_nfe=20, max_page_size=100))
    with app.state.sessions() as s:
        key = create_key(s, "alice")[1]
    with TestClient(app) as client:
        yield app, client, key


def test_the_table_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_malformed_requests(setup):
    app, client, key = setup
    failures = []
    for name, method, path, body, extra, status, field in CASES:
        headers = {"X-API-Key": key, **extra}
        if isinstance(body, str):
            r = client.request(method, path, content=body, headers={**headers, "Content-Type": "application/json"})
        elif body is not None:
            r = client.request(method, path, json=body, headers=headers)
        else:
            r = client.request(method, path, headers=headers)
        fields = [e["field"] for e in r.json().get("errors", [])] if r.headers.get("content-type", "").startswith(
            "application/json") else []
        if r.status_code != status or (field is not None and field not in fields):
            failures.append(f"{name}: got {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    with app.state.sessions() as s:
        assert repo.count_jobs(s) == 0                  # nothing half-written
    assert client.post("/v1/jobs", json=GOOD, headers={"X-API-Key": key}).status_code == 202   # control
