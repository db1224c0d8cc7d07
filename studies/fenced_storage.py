"""An Optuna RDB storage whose writes are fenced by a job's claim token.

The job row is fenced by its claim token (`studies.jobs`); a runner frozen past `--stale-after` (SIGSTOP, a long
GC pause, a VM migration) must not write to the study either once another runner resumed the job, or it
finishes trials the rescuer queued and leaves others RUNNING for good. `FencedStorage` checks, inside every
transaction that wrote something and just before its COMMIT, that the job's `claim_token` is still this
runner's; when it is not, the transaction rolls back and `ClaimLost` is raised.

Check and write are one transaction, so no write slips in between:

* PostgreSQL: the check is `SELECT claim_token ... FOR SHARE`. A re-claim (an UPDATE of that row) either
  committed before it, and the check sees the new token, or it waits until this transaction ended, and the
  rescuer then reads the trials it wrote.
* SQLite: every transaction of the storage is BEGIN IMMEDIATE (`studies.optuna_storage`), so it holds the
  database write lock from its first statement; no claim commits in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.storages import RDBStorage
from sqlalchemy import Connection, event, select
from sqlalchemy.orm import Session

from .db import is_postgres
from .models import Job
from .optuna_storage import optuna_storage

__all__ = ["Claim", "ClaimLost", "FencedStorage", "fenced_storage", "claim_lost_in"]

_WROTE = "s3s_fence_wrote"          # Connection.info key: this transaction sent a write
# Statements that never write. Anything else counts as a write (an unknown statement costs one extra check,
# a missed write would go unfenced).
_READS = ("SELECT", "PRAGMA", "SHOW", "BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK")


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str


class ClaimLost(Exception):
    """This runner's claim on the job is gone (re-claimed, released or ended elsewhere); nothing was written."""

    def __init__(self, job_id: str):
        super().__init__(f"the claim on job {job_id} was lost; the write was rolled back")
        self.job_id = job_id


def claim_lost_in(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling, a ClaimLost (a search may wrap or mask it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ClaimLost):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _is_write(statement: str) -> bool:
    head = statement.lstrip().split(None, 1)
    return not head or head[0].upper() not in _READS


class FencedStorage(RDBStorage):
    """RDBStorage that raises ClaimLost instead of committing a write once `claim` no longer holds."""

    def __init__(self, url: str, claim: Claim, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.claim = claim
        self._install()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)      # a fresh engine and session factory: listen to them too
        self._install()

    def _install(self) -> None:
        event.listen(self.engine, "begin", _forget_writes)
        event.listen(self.engine, "before_cursor_execute", _note_write)
        event.listen(self.scoped_session, "before_commit", self._before_commit)

    def _before_commit(self, session: Session) -> None:
        session.flush()                  # pending ORM changes are writes of this transaction too
        conn = session.connection()
        if conn.info.get(_WROTE):
            self.check(conn)

    def check(self, conn: Connection) -> None:
        """Raise ClaimLost unless the job's claim token is still ours, holding the row until this transaction ends
        (PostgreSQL; SQLite holds the whole database already)."""
        q = select(Job.claim_token).where(Job.id == self.claim.job_id)
        if is_postgres(conn.engine):
            q = q.with_for_update(read=True)          # FOR SHARE: a re-claim waits for our COMMIT
        if conn.execute(q).scalar() != self.claim.token:
            raise ClaimLost(self.claim.job_id)


def _forget_writes(conn: Connection) -> None:
    conn.info[_WROTE] = False


def _note_write(conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
    if _is_write(statement):
        conn.info[_WROTE] = True


def fenced_storage(url: str, claim: Claim, *, idle_timeout_s: float = 60.0) -> FencedStorage:
    """The job's study storage, fenced by `claim`.

    On PostgreSQL, a transaction left idle longer than `idle_timeout_s` is ended by the server: a runner frozen in
    the middle of one (SIGSTOP) would otherwise hold its row locks, and the rescuer would wait on them forever.
    Its late COMMIT then fails, which is what fencing wants anyway.
    """
    engine_kwargs: dict[str, Any] = {}
    if is_postgres(url):
        ms = max(1000, int(idle_timeout_s * 1000))
        engine_kwargs["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={ms}"}
    return optuna_storage(url, factory=lambda u, **kw: FencedStorage(u, claim, **kw), **engine_kwargs)
