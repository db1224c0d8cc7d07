"""The job contract over HTTP, against a real uvicorn process on SQLite and PostgreSQL: every invalid option set
is a 422 naming its field and writes nothing; the OpenAPI bounds are the server's; the quota holds with or
without an Idempotency-Key; REST and the CLI pick the same default metric; an accepted job's spec is the
typed contract's document."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from s3search.search.config import SearchConfig
from s3search.search.options import option_rules

from test_options import BAD_OPTIONS  # tests/ is on sys.path (tests/conftest.py)
from .procs import report_best, serving

GOOD = {"model": "gmm-64d", "nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}
# More than the contract's own table: what only the service adds (server-only options, its limits, the model's
# metric), and the top-level fields.
SERVICE_CASES = [
    ({"options": {"evaluator": {"device": "cuda"}}}, "options.evaluator"),
    ({"options": {"warm_start": {"studies": ["x"]}}}, "options.warm_start.studies"),   # names only jobs, predictors
    ({"options": {"validation_samples": 20_000}}, "options.validation_samples"),   # S3S_MAX_TEST_SAMPLES=100
    ({"options": {"batch_size": 5000}}, "options.batch_size"),
    ({"metric": "fid"}, "metric"),                                                 # no feature network
    ({"metric": "no-such-metric"}, "metric"),
    ({"n_samples": 1}, "n_samples"), ({"n_samples": 200}, "n_samples"), ({"budget": 101}, "budget"),
    ({"nfe": 51}, "nfe"), ({"nfe": [4, 1]}, "nfe"), ({"seed": -1}, "seed"),
]


@pytest.fixture()
def server(db_url, tmp_path):
    with serving(db_url, tmp_path, "contract-user", S3S_MAX_BUDGET="100", S3S_MAX_SAMPLES="100",
                 S3S_MAX_TEST_SAMPLES="100", S3S_MAX_ACTIVE_JOBS_PER_OWNER="2", S3S_MAX_PAGE_SIZE="40") as (base, key):
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30) as c:
            yield c


def _body(change: dict) -> dict:
    body = {**GOOD, **{k: v for k, v in change.items() if k != "options"}}
    if "options" in change:
        body["options"] = change["options"]
    return body


def test_invalid_option_sets_are_422s_naming_their_field_and_write_nothing(server):
    cases = [({"options": o}, f) for o, f in BAD_OPTIONS] + SERVICE_CASES
    assert len(cases) >= 40
    failures = []
    for change, field in cases:
        # json.dumps writes NaN / Infinity as JSON's common extension; the server must refuse them too.
        r = server.post("/v1/jobs", content=json.dumps(_body(change)), headers={"Content-Type": "application/json"})
        fields = [e["field"] for e in r.json().get("errors", [])] if r.status_code == 422 else []
        # A more precise path names the field too ("options.space.bogus" for options.space).
        if r.status_code != 422 or not any(f == field or f.startswith((field + ".", field + "[")) for f in fields):
            failures.append(f"{change}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    assert server.get("/v1/jobs").json()["total"] == 0           # nothing half-written


def test_an_accepted_job_carries_the_contracts_document(server):
    r = server.post("/v1/jobs", json={**GOOD, "model": "digits", "options": {"batch_size": 4}})
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["metric"] == "fd-features"                          # the model's default, as the CLI picks
    config = SearchConfig.from_dict(spec)
    assert config.options.batch_size == 4 and config.to_dict(include_server_only=False) == spec
    assert r.json()["links"]["dashboard"]                           # the study exists from the start
    assert r.json()["created_at"].endswith(("Z", "+00:00"))          # RFC 3339 date-time: with its offset


def test_the_openapi_bounds_are_the_servers(server):
    doc = server.get("/openapi.json").json()
    job = doc["components"]["schemas"]["JobCreate"]["properties"]
    assert job["budget"]["maximum"] == 100 and job["n_samples"]["maximum"] == 100
    nfe_int = next(b for b in job["nfe"]["anyOf"] if b.get("type") == "integer")
    assert (nfe_int["minimum"], nfe_int["maximum"]) == (2, 50)
    limit = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "limit")
    assert max(b.get("maximum", 0) for b in limit["schema"]["anyOf"]) == 40
    opts = doc["components"]["schemas"]["SearchOptions"]["properties"]
    public = {k for k, r in option_rules().items() if not r.server_only}
    assert set(opts) == public
    assert opts["batch_size"]["minimum"] == 1 and opts["batch_size"]["maximum"] == option_rules()["batch_size"].le
    listed = server.get("/v1/options").json()["search_options"]
    assert set(listed) == public and listed["refine_share"]["exclusive_maximum"] == 1
    assert server.get("/v1/jobs", params={"limit": 41}).status_code == 422


def test_the_quota_holds_with_and_without_an_idempotency_key(server):
    codes = [server.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": f"k{i}"}).status_code
             for i in range(4)]
    assert codes == [202, 202, 429, 429]
    assert server.post("/v1/jobs", json=GOOD).status_code == 429
    replay = server.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "k0"})
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert server.get("/v1/jobs").json()["total"] == 2


def test_nan_and_infinity_never_reach_a_job(server):
    for text in ('"batch_size": NaN', '"refine_sigma": Infinity', '"direct": -Infinity'):
        body = '{"model": "gmm-64d", "nfe": 5, "budget": 3, "options": {' + text + '}}'
        r = server.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"].startswith("options."), r.text
    assert math.isfinite(server.get("/v1/jobs").json()["total"]) and server.get("/v1/jobs").json()["total"] == 0


def test_schedule_of_a_running_job_is_always_a_schema_valid_native_document(server, db_url):
    """While a job runs its best may be a named sampler (a baseline the space cannot express); /schedule then
    returns the named-schedule document, which the shipped named-schedule schema validates."""
    import jsonschema

    from s3search import baselines, grids
    from s3search.schema_export import NAMED_SCHEMA_PATH, SCHEMA_PATH
    r = server.post("/v1/jobs", json=GOOD)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    named = baselines.get("edm_heun", timesteps=grids.get("edm", process="edm", n=3), process="edm")
    report_best(db_url, job_id, named.to_dict())
    doc = server.get(f"/v1/jobs/{job_id}/schedule").json()
    assert "sampler" in doc
    jsonschema.validate(doc, json.loads(NAMED_SCHEMA_PATH.read_text()))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))


def test_an_unknown_option_says_where_the_known_ones_are_and_a_server_option_says_whose_it_is(server):
    r = server.post("/v1/jobs", json={**GOOD, "options": {"bogus": 1, "evaluator": {}}})
    messages = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert r.status_code == 422
    assert "GET /v1/options" in messages["options.bogus"]
    assert "set by the server" in messages["options.evaluator"]


def test_conditioning_fields_are_refused_for_a_model_without_prompts_and_bounded(server):
    r = server.post("/v1/jobs", json={**GOOD, "guidance_scale": 7.5})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "guidance_scale"
    assert "not text-conditioned" in r.text
    r = server.post("/v1/jobs", json={**GOOD, "prompt_set": "coco"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "prompt_set"
    r = server.post("/v1/jobs", json={**GOOD, "guidance_scale": 500})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "guidance_scale"
    r = server.post("/v1/jobs", json={**GOOD, "prompt_set": "../captions.txt"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "prompt_set"     # a name, never a path
