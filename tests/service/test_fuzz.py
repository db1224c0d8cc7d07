"""Property-based fuzz of the OpenAPI schema (schemathesis): no generated request gets a 5xx."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api import Settings, create_app
from studies.keys import create_key

from .conftest import drop_postgres, fresh_postgres_url, PG_OK


def _app(url: str):
    app = create_app(Settings(database_url=url, max_budget=100, max_samples=1000, max_request_bytes=8192))
    with app.state.sessions() as s:
        app.state.fuzz_key = create_key(s, "fuzzer")[1]
    return app


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    return _app(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")


def _operations():
    app = _app("sqlite://")          # only to read the schema; the fuzzing uses the module's app
    ops = [r.ok() for r in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]
    app.state.engine.dispose()
    return ops


# schemathesis' own pytest plugin does not load under this pytest; drive its strategies with hypothesis.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("label", [op.label for op in _operations()])
def test_no_server_error(fuzz_app, label, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        headers = dict(case.headers or {})
        headers.setdefault("X-API-Key", fuzz_app.state.fuzz_key)
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} " \
                                           f"{response.text[:300]}"

    try:
        check()
    except Unsatisfiable:
        pytest.skip(f"{label} takes no input that can be made invalid")


@pytest.mark.postgres
@pytest.mark.skipif(not PG_OK, reason="no PostgreSQL on 127.0.0.1:5432")
def test_text_that_postgres_dislikes_is_stored_or_refused_cleanly():
    from fastapi.testclient import TestClient

    url = fresh_postgres_url()
    try:
        app = _app(url)
        with TestClient(app) as client:
            body = {"model": "gmm-64d", "nfe": 5, "budget": 3, "predictor": "ridge",
                    "options": {"baselines": ["nul\u0000byte \U0001F600 \\u0000"]}}
            hdr = {"X-API-Key": app.state.fuzz_key, "Content-Type": "application/json"}
            r = client.post("/v1/jobs", content=json.dumps(body), headers=hdr)
            assert r.status_code == 202, r.text
            got = client.get(r.headers["location"], headers={"X-API-Key": app.state.fuzz_key}).json()
            assert got["spec"]["options"]["baselines"] == body["options"]["baselines"]
            # A lone surrogate is valid JSON text but no valid UTF-8: refused, not a 500.
            lone = json.dumps({**body, "options": {"baselines": ["x"]}}).replace('"x"', '"\\udc00"')
            r = client.post("/v1/jobs", content=lone, headers=hdr)
            assert r.status_code == 422 and r.json()["errors"][0]["field"].startswith("options"), r.text
        app.state.engine.dispose()
    finally:
        drop_postgres(url)
