"""Fixtures of the service tests: every storage test runs on a SQLite file and on a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from studies.db import make_engine, make_session_factory, normalize_url
from studies.migrate import upgrade

PG_ADMIN_URL = os.environ.get("S3S_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        eng = create_engine(normalize_url(PG_ADMIN_URL), connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:
        return False


PG_OK = _pg_available()


def fresh_postgres_url() -> str:
    """Create a throw-away database (other helpers use `test` at the same time) and return its URL."""
    name = f"s3s_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalize_url(PG_ADMIN_URL)).set(database=name).render_as_string(hide_password=False)


def drop_postgres(url: str) -> None:
    name = make_url(url).database
    admin = create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


BACKENDS = ["sqlite", pytest.param("postgres", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not PG_OK, reason="no PostgreSQL on 127.0.0.1:5432")])]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.db'}"
        upgrade(url)
        yield url
        return
    url = fresh_postgres_url()
    try:
        upgrade(url)
        yield url
    finally:
        drop_postgres(url)


@pytest.fixture()
def engine(db_url: str):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture()
def sessions(engine):
    return make_session_factory(engine)


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    if not PG_OK:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    url = fresh_postgres_url()
    try:
        upgrade(url)
        yield url
    finally:
        drop_postgres(url)


# Real-process tests take about a minute per backend on this machine: the SQLite run stays in the default
# suite, the PostgreSQL run of the same test goes to the slow (benchmark) suite.
_SLOW_ON_POSTGRES = ("test_e2e.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _SLOW_ON_POSTGRES and "[postgres" in item.nodeid:
            item.add_marker(pytest.mark.slow)
