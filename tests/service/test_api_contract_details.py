"""Contract details over HTTP against a real `s3search serve`: header and body limits answer with the JSON error
body (431, 413), a body that is not JSON is a 415 naming Content-Type, the API-key scheme is in the OpenAPI
document, and `keys revoke` never prints a key back."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from .procs import cli_env, cli_run, serving

GOOD = {"model": "gmm-64d", "nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}
MAX_REQUEST_BYTES = 4096
MAX_HEADER_BYTES = 32 * 1024           # the default


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A real server on a SQLite file with a small body limit; yields (base url, API key)."""
    tmp = tmp_path_factory.mktemp("contract")
    with serving(f"sqlite:///{tmp / 'service.db'}", tmp, S3S_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES)) as served:
        yield served


@pytest.fixture()
def client(api) -> Iterator[httpx.Client]:
    base, key = api
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30) as c:
        yield c


def assert_error_body(r: httpx.Response, status: int, field: str) -> str:
    """The response is the declared ErrorBody with `status`, naming `field`; returns its detail."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert [e["field"] for e in body["errors"]] == [field], body
    return body["detail"]


def job_count(client: httpx.Client) -> int:
    return client.get("/v1/jobs").json()["total"]


# ----- a. request headers --------------------------------------------------------------------------------
def test_a_header_over_the_limit_is_431_naming_it(client):
    r = client.get("/v1/jobs", headers={"X-Big": "a" * (MAX_HEADER_BYTES + 1000)})
    detail = assert_error_body(r, 431, "x-big")
    assert str(MAX_HEADER_BYTES) in detail and "S3S_MAX_HEADER_BYTES" in detail
    assert client.get("/v1/jobs").status_code == 200          # a normal request still works


def _send_until_answered(base: str, head: bytes, value_bytes: int, piece: int = 16 * 1024) -> tuple[bytes, int]:
    """Stream a request whose one header value is `value_bytes` long, a piece at a time, and stop as soon as the
    server answers. Returns (what the server sent, header bytes sent by then)."""
    host, port = base.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        while sent < value_bytes:
            if select.select([s], [], [], 0.01)[0]:
                break
            try:
                s.sendall(b"a" * piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += piece
        else:
            s.sendall(b"\r\n\r\n")
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply, sent


def test_a_1mib_header_is_cut_off_while_it_arrives(api, client):
    base, key = api
    head = f"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nX-Big: ".encode()
    start = time.monotonic()
    reply, sent = _send_until_answered(base, head, 1024 * 1024)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:300]
    assert sent < 1024 * 1024, "the server read the whole header before answering"
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["errors"][0]["field"] == "headers" and "S3S_MAX_HEADER_BYTES" in body["detail"]
    assert time.monotonic() - start < 10
    assert client.get("/v1/jobs").status_code == 200


def test_a_1mib_header_sent_at_once_is_not_accepted(api, client):
    base, key = api
    try:
        r = httpx.get(f"{base}/v1/jobs", headers={"X-API-Key": key, "X-Big": "a" * (1024 * 1024)}, timeout=30)
    except httpx.TransportError:
        return                         # cut off while it was sent: not accepted either
    assert r.status_code == 431, r.text[:300]
    assert client.get("/v1/jobs").status_code == 200


# ----- b. request bodies ---------------------------------------------------------------------------------
def _big_job() -> bytes:
    return json.dumps({**GOOD, "options": {"pad": "x" * (2 * MAX_REQUEST_BYTES)}}).encode()


def test_b_declared_content_length_over_the_limit_is_a_json_413(client):
    before = job_count(client)
    r = client.post("/v1/jobs", content=_big_job(), headers={"Content-Type": "application/json"})
    detail = assert_error_body(r, 413, "body")
    assert str(MAX_REQUEST_BYTES) in detail and "S3S_MAX_REQUEST_BYTES" in detail
    assert job_count(client) == before


def test_b_chunked_body_over_the_limit_is_a_json_413(client):
    body = _big_job()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    before = job_count(client)
    r = client.post("/v1/jobs", content=pieces(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    detail = assert_error_body(r, 413, "body")
    assert str(MAX_REQUEST_BYTES) in detail
    assert job_count(client) == before


def test_b_413_on_a_route_that_reads_no_body_is_json_too(client):
    r = client.post(f"/v1/jobs/{'0' * 32}/cancel", content=b"x" * (2 * MAX_REQUEST_BYTES))
    assert_error_body(r, 413, "body")


def test_b_a_body_under_the_limit_is_accepted(client):
    r = client.post("/v1/jobs", content=json.dumps(GOOD), headers={"Content-Type": "application/json"})
    assert r.status_code == 202, r.text


# ----- c. content type -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_c_json_without_the_json_content_type_is_415(client, content_type):
    before = job_count(client)
    # httpx adds no Content-Type to raw content; the None case sends none at all.
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/jobs", content=json.dumps(GOOD), headers=headers)
    detail = assert_error_body(r, 415, "Content-Type")
    assert "application/json" in detail
    if content_type:
        assert content_type in detail
    assert job_count(client) == before


def test_c_a_json_body_that_is_no_object_stays_a_422_on_body(client):
    r = client.post("/v1/jobs", json=[GOOD])
    assert_error_body(r, 422, "body")


# ----- d. the security scheme ----------------------------------------------------------------------------
def test_d_openapi_declares_the_api_key_schemes_on_every_v1_route(client):
    doc = httpx.get(f"{client.base_url}/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert (schemes["ApiKey"]["type"], schemes["ApiKey"]["in"], schemes["ApiKey"]["name"]) == \
        ("apiKey", "header", "X-API-Key")
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    v1 = [(path, method, op) for path, ops in doc["paths"].items() if path.startswith("/v1/")
          for method, op in ops.items()]
    assert any(path == "/v1/jobs" and method == "post" for path, method, _ in v1)
    for path, method, op in v1:
        assert {"ApiKey": []} in op.get("security", []) and {"Bearer": []} in op["security"], (path, method)
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_d_post_jobs_requires_the_key_and_takes_it_either_way(api, client):
    base, key = api
    r = httpx.post(f"{base}/v1/jobs", json=GOOD)
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
    assert "X-API-Key" in r.json()["detail"]
    assert httpx.post(f"{base}/v1/jobs", json=GOOD, headers={"Authorization": "Basic eDp5"}).status_code == 401
    r = httpx.post(f"{base}/v1/jobs", json={**GOOD, "seed": 11}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text


# ----- e. keys revoke ------------------------------------------------------------------------------------
def test_e_keys_revoke_prints_only_the_key_id(tmp_path):
    env = cli_env(f"sqlite:///{tmp_path / 'keys.db'}")
    made = cli_run(["keys", "create", "carol"], env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id, secret = key.split("_")[1], key.split("_", 2)[2]

    revoked = cli_run(["keys", "revoke", key], env)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked {key_id}"
    again = cli_run(["keys", "revoke", key], env)
    assert again.returncode == 1 and again.stderr.strip() == f"no active key {key_id}"
    not_a_key = cli_run(["keys", "revoke", secret], env)          # e.g. only the secret half pasted
    assert not_a_key.returncode == 2
    for run in (revoked, again, not_a_key):
        assert secret not in run.stdout + run.stderr
    listed = cli_run(["keys", "list"], env)
    assert key_id in listed.stdout and "revoked" in listed.stdout
