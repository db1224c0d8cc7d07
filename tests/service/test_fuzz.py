"""Property-based fuzz of the OpenAPI schema (schemathesis), bounded, with all of its checks."""

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


def _headers_made_invalid(case) -> bool:
    """Whether this negative case broke the headers on purpose (then they go as generated, auth included)."""
    from schemathesis.core.parameters import ParameterLocation

    info = (case.meta.components if case.meta else {}).get(ParameterLocation.HEADER)
    return info is not None and info.mode == GenerationMode.NEGATIVE


def _fuzz(app, label: str, mode: GenerationMode, examples: int) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    op = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        headers = dict(case.headers or {})
        if not _headers_made_invalid(case):
            headers["X-API-Key"] = app.state.fuzz_key      # a real key: reach past authentication
            headers.pop("Authorization", None)
        # Every check schemathesis has: no 5xx, documented status codes and content types, responses that
        # match their schemas, schema-valid requests accepted and schema-invalid ones refused.
        case.call_and_validate(headers=headers)

    try:
        check()
    except Unsatisfiable:
        pytest.skip(f"{label} takes no input that can be made invalid")


# schemathesis' own pytest plugin does not load under this pytest; drive its strategies with hypothesis.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("label", [op.label for op in _operations()])
def test_all_checks_pass(fuzz_app, label, mode):
    _fuzz(fuzz_app, label, mode, examples=12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("label", [op.label for op in _operations()])
def test_all_checks_pass_longer(fuzz_app, label, mode):
    _fuzz(fuzz_app, label, mode, examples=300)


@pytest.mark.postgres
@pytest.mark.skipif(not PG_OK, reason="no PostgreSQL on 127.0.0.1:5432")
def test_text_that_postgres_dislikes_is_stored_or_refused_cleanly():
    from fastapi.testclient import TestClient

    url = fresh_postgres_url()
    try:
        app = _app(url)
        with TestClient(app) as client:
            # The job holds no free text any more (names are enums or patterns); text PostgreSQL cannot store
            # (a NUL byte, a lone surrogate) is refused with a 422 naming the field, never a 500.
            hdr = {"X-API-Key": app.state.fuzz_key, "Content-Type": "application/json"}
            for text in (r"nul\u0000byte", r"\udc00"):          # JSON escapes, as a client sends them
                body = ('{"model": "gmm-64d", "nfe": 5, "budget": 3, "predictor": "ridge", '
                        '"options": {"baselines": ["' + text + '"], "predictor_params": {"k": "' + text + '"}}}')
                r = client.post("/v1/jobs", content=body, headers=hdr)
                assert r.status_code == 422, r.text
                assert all(e["field"].startswith("options") for e in r.json()["errors"]), r.text
                assert "options.baselines[0]" in r.text
            assert client.get("/v1/jobs", headers={"X-API-Key": app.state.fuzz_key}).json()["total"] == 0
        app.state.engine.dispose()
    finally:
        drop_postgres(url)
