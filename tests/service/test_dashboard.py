"""`s3search dashboard` over HTTP, as a real process on a SQLite file: read-only unless --allow-writes, refuses
to start beyond loopback without a password, and with one asks every request for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import optuna
import pytest

from studies.migrate import upgrade
from studies.optuna_storage import optuna_storage

from .procs import cli, cli_env, cli_run, free_port, stop, wait_http

PASSWORD = "correct horse battery staple"


@pytest.fixture()
def db(tmp_path) -> tuple[str, int]:
    """A service database holding one study with three finished trials; yields (url, study id)."""
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade(url)
    storage = optuna_storage(url)
    study = optuna.create_study(storage=storage, study_name="s3s-job-dashboard-test")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    storage.engine.dispose()
    return url, study._study_id


def trial_count(url: str, study_id: int) -> int:
    storage = optuna_storage(url)
    try:
        return len(storage.get_all_trials(study_id))
    finally:
        storage.engine.dispose()


@contextmanager
def dashboard(url: str, log: Path, *args: str, **env: str) -> Iterator[str]:
    port = free_port()
    proc = cli(["dashboard", "--port", str(port), *args], cli_env(url, **env), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        print("--- dashboard log ---\n" + log.read_text()[-3000:])


def test_read_only_by_default(db, tmp_path):
    url, study_id = db
    with dashboard(url, tmp_path / "dash.log") as base:
        r = httpx.get(f"{base}/api/studies", timeout=30)
        assert r.status_code == 200
        assert [s["study_id"] for s in r.json()["study_summaries"]] == [study_id]
        assert httpx.get(f"{base}/api/studies/{study_id}", timeout=30).status_code == 200

        refused = [httpx.delete(f"{base}/api/studies/{study_id}", timeout=30),
                   httpx.post(f"{base}/api/studies", json={"study_name": "new", "directions": ["minimize"]},
                              timeout=30),
                   httpx.post(f"{base}/api/studies/{study_id}/rename", json={"study_name": "other"}, timeout=30),
                   httpx.put(f"{base}/api/studies/{study_id}/note", json={"version": 1, "body": "x"}, timeout=30),
                   httpx.post(f"{base}/incompatible-rdb-schema", timeout=30)]
        for r in refused:
            assert r.status_code == 405, (r.request.method, r.request.url, r.text)
            assert "--allow-writes" in r.json()["detail"] and r.headers["allow"] == "GET, HEAD"
        summaries = httpx.get(f"{base}/api/studies", timeout=30).json()["study_summaries"]
        assert [(s["study_id"], s["study_name"]) for s in summaries] == [(study_id, "s3s-job-dashboard-test")]
    assert trial_count(url, study_id) == 3


def test_allow_writes_lets_a_delete_through(db, tmp_path):
    url, study_id = db
    with dashboard(url, tmp_path / "dash.log", "--allow-writes") as base:
        assert httpx.delete(f"{base}/api/studies/{study_id}", timeout=30).status_code == 204
        assert httpx.get(f"{base}/api/studies", timeout=30).json()["study_summaries"] == []


def test_beyond_loopback_without_a_password_it_refuses_to_start(db):
    url, _ = db
    env = cli_env(url)
    env.pop("S3S_DASHBOARD_PASSWORD", None)
    run = cli_run(["dashboard", "--host", "0.0.0.0", "--port", str(free_port())], env, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "S3S_DASHBOARD_PASSWORD" in run.stderr and "--host" in run.stderr


def test_with_a_password_every_request_needs_it(db, tmp_path):
    url, study_id = db
    with dashboard(url, tmp_path / "dash.log", "--host", "0.0.0.0", S3S_DASHBOARD_PASSWORD=PASSWORD) as base:
        r = httpx.get(f"{base}/api/studies", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Basic realm="s3search')
        assert httpx.get(f"{base}/api/studies", auth=("s3search", "wrong"), timeout=30).status_code == 401
        assert httpx.get(f"{base}/api/studies", auth=("admin", PASSWORD), timeout=30).status_code == 401
        assert httpx.delete(f"{base}/api/studies/{study_id}", timeout=30).status_code == 401
        ok = httpx.get(f"{base}/api/studies", auth=("s3search", PASSWORD), timeout=30)
        assert ok.status_code == 200 and len(ok.json()["study_summaries"]) == 1
        # Credentials do not make it writable.
        assert httpx.delete(f"{base}/api/studies/{study_id}", auth=("s3search", PASSWORD),
                            timeout=30).status_code == 405
    assert trial_count(url, study_id) == 3
