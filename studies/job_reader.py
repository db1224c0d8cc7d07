"""The API's hot read (GET /v1/jobs/{id}) without a thread-pool hop.

A sync read run through the thread pool costs more CPU than the read itself (anyio's hop, then the GIL passed
between the pool thread and the busy event loop), and under 20 concurrent clients that hand-over is what set
the p99. So the read runs on the event loop:

- PostgreSQL: psycopg's own async connections, a few per process, in autocommit (one round trip per read:
  no BEGIN and ROLLBACK around the SELECT). The query is idempotent, so a connection the database closed (a
  restart, an idle timeout) is replaced and the read retried once, which is what pool_pre_ping buys the sync
  engine, without its round trip per read.
- SQLite: the sync Core read, called directly. It is a primary-key lookup in a local file under WAL, where a
  reader does not wait for writers; tens of microseconds, less than the hop would cost.

Both return the columns of `studies.jobs.PUBLIC_COLUMNS`, by name, for the owner's job only.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from sqlalchemy import Engine

from .db import is_postgres
from .jobs import PUBLIC_JOB_SELECT, read_job

__all__ = ["JobReader"]


class JobReader:
    """`await reader.read(job_id, owner)`: the public columns of owner's job (attribute access), or None."""

    def __init__(self, engine: Engine, max_connections: int = 8):
        self.engine = engine
        self.max_connections = max_connections
        self._postgres = is_postgres(engine)
        self._sql = str(PUBLIC_JOB_SELECT.compile(dialect=engine.dialect)) if self._postgres else ""
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle: list[Any] = []
        self._slots: Optional[asyncio.Semaphore] = None

    async def read(self, job_id: str, owner: str) -> Optional[Any]:
        if not self._postgres:
            return read_job(self.engine, job_id, owner)
        return await self._read_postgres({"job_id": job_id, "owner": owner})

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    # ----- PostgreSQL ---------------------------------------------------------------------------------------
    def _bind_loop(self) -> asyncio.Semaphore:
        # Async connections belong to the loop that opened them. A new loop (a second TestClient, a restarted
        # server in one process) starts a fresh set; the old loop's sockets are closed without awaiting it.
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:
            for conn in self._idle:
                conn.pgconn.finish()
            self._loop, self._idle = loop, []
            self._slots = asyncio.Semaphore(self.max_connections)
        return self._slots

    async def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import namedtuple_row

        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        cparams.pop("context", None)      # SQLAlchemy's sync adapters; psycopg's defaults load JSON the same way
        return await psycopg.AsyncConnection.connect(*cargs, **cparams, autocommit=True, row_factory=namedtuple_row)

    async def _read_postgres(self, params: dict[str, str]) -> Optional[Any]:
        import psycopg

        async with self._bind_loop():
            while True:
                pooled = bool(self._idle)
                conn = self._idle.pop() if pooled else await self._connect()
                try:
                    cur = await conn.execute(self._sql, params)
                    row = await cur.fetchone()
                except psycopg.OperationalError:
                    broken = conn.broken
                    await conn.close()
                    if pooled and broken:
                        continue      # the database closed this pooled connection: retry on another or a new one
                    raise
                except BaseException:
                    await conn.close()   # cancelled mid-query: the connection's state is unknown
                    raise
                self._idle.append(conn)
                return row
