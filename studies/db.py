"""Engines and sessions from a database URL: a SQLite file by default, PostgreSQL through DATABASE_URL."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["DEFAULT_DATABASE_URL", "normalize_url", "database_url", "make_engine", "make_session_factory",
           "is_sqlite", "is_postgres", "utcnow", "sqlite_immediate_transactions", "read_only", "READ_ONLY"]

DEFAULT_DATABASE_URL = "sqlite:///s3search.db"
READ_ONLY = "s3s_read_only"     # execution option: this transaction will not write


def utcnow() -> datetime:
    # Naive UTC everywhere: SQLite keeps no zone, and one convention keeps comparisons portable.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def normalize_url(url: str) -> str:
    """Accept the URLs people write (postgres://, postgresql://) and pick the psycopg 3 driver we ship."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("database_url must be a non-empty database URL")
    url = url.strip()
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"database_url={parsed.get_backend_name()!r}: only sqlite and postgresql are supported")
    return parsed.render_as_string(hide_password=False)


def database_url(url: str | None = None) -> str:
    return normalize_url(url or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)


def is_sqlite(url_or_engine: str | Engine) -> bool:
    name = url_or_engine.dialect.name if isinstance(url_or_engine, Engine) else make_url(url_or_engine).get_backend_name()
    return name == "sqlite"


def is_postgres(url_or_engine: str | Engine) -> bool:
    name = url_or_engine.dialect.name if isinstance(url_or_engine, Engine) else make_url(url_or_engine).get_backend_name()
    return name == "postgresql"


def sqlite_immediate_transactions(engine: Engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE with a busy timeout and WAL.

    A deferred transaction that reads and then writes fails at once with "database is locked" when another
    process committed in between (the busy handler is not consulted for that upgrade); taking the write lock at
    BEGIN makes writers queue on the busy timeout instead. WAL keeps readers from blocking the writer.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None   # we emit BEGIN ourselves
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL cannot corrupt the file; it only drops the fsync per commit (a power cut may lose
        # the last commits). Jobs and heartbeats commit often, so this is most of a write's cost.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A transaction that only reads (marked by `read_only`) never upgrades, so it may start deferred and
        # then does not queue behind writers.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    url = database_url(url)
    if is_sqlite(url):
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        kwargs["connect_args"].setdefault("check_same_thread", False)
        engine = create_engine(url, **kwargs)
        sqlite_immediate_transactions(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def read_only(session: Session) -> Session:
    """Mark the session's next transaction as read-only (SQLite: a deferred BEGIN). No effect on PostgreSQL,
    nor when a transaction is already open."""
    if not session.in_transaction():
        session.connection(execution_options={READ_ONLY: True})
    return session


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)
