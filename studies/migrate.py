"""Run the service's Alembic migrations from code (`upgrade head`), so no alembic command line is needed."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect

from .db import database_url, make_engine

__all__ = ["alembic_config", "upgrade", "current_revision", "head_revision"]

_HERE = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(_HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    # ConfigParser interpolation would eat a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    return cfg


def upgrade(url_or_engine: str | Engine | None = None, revision: str = "head") -> None:
    """Bring the service tables to `revision`; safe to call on every start."""
    if isinstance(url_or_engine, Engine):
        engine, owned = url_or_engine, False
    else:
        engine, owned = make_engine(url_or_engine), True
    try:
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Two processes starting on a fresh database would both try to create the tables.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(733104)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        if owned:
            engine.dispose()


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision in this package (fixed for the life of the process; readiness asks often)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    if not inspect(engine).has_table("s3s_alembic_version"):
        return None
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT version_num FROM s3s_alembic_version").first()
    return row[0] if row else None
