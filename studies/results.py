"""What the API reads from and records about a job's study: its Optuna study, pages of trials, exports.

The API goes through these functions, never through Optuna's tables or a Session commit of its own, so the
storage layout stays this package's business.
"""

from __future__ import annotations

from typing import Any, Optional

import optuna
from optuna.trial import TrialState
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from .models import Export, Job

__all__ = ["open_job_study", "page_of_trials", "record_export", "job_results"]


def open_job_study(session: Session, storage: Any, job: Job) -> Optional[int]:
    """Create the job's (empty) Optuna study now and store its id on the job, so the dashboard link exists as
    soon as the job does; the runner later loads the same study by name. None when the storage refused."""
    try:
        study = optuna.create_study(study_name=job.study_name, storage=storage, direction="minimize",
                                    load_if_exists=True)
    except Exception:  # noqa: BLE001 - the runner creates the study anyway; only the early link is lost
        return None
    study_id = int(study._study_id)  # noqa: SLF001 - the id the dashboard's URLs use
    session.execute(update(Job).where(Job.id == job.id, Job.optuna_study_id.is_(None))
                    .values(optuna_study_id=study_id))
    session.commit()
    job.optuna_study_id = study_id
    return study_id


def page_of_trials(storage: Any, study_id: int, state: Optional[str], limit: int, offset: int
                   ) -> tuple[int, list[Any]]:
    """(total, one page of FrozenTrials by trial number). Reads only the page's trials: Optuna's public API
    loads a whole study per call, which costs about a second per page at a few thousand trials. The ids come
    from Optuna's `trials` table; if its layout ever differs, fall back to the public API."""
    where = "study_id = :sid" + (" AND state = :state" if state else "")
    params: dict[str, Any] = {"sid": study_id, "state": state, "limit": limit, "offset": offset}
    try:
        with storage.engine.connect() as conn:
            total = int(conn.execute(text(f"SELECT count(*) FROM trials WHERE {where}"), params).scalar_one())
            ids = conn.execute(text(f"SELECT trial_id FROM trials WHERE {where} ORDER BY number "
                                    "LIMIT :limit OFFSET :offset"), params).scalars().all()
        return total, [storage.get_trial(i) for i in ids]
    except SQLAlchemyError:
        states = (TrialState[state],) if state else None
        trials = storage.get_all_trials(study_id, deepcopy=False, states=states)
        return len(trials), trials[offset:offset + limit]


def record_export(session: Session, job_id: str, fmt: str, schedule_hash: str, document: dict[str, Any]) -> None:
    """Keep each exported document once per (job, format, schedule)."""
    session.add(Export(job_id=job_id, format=fmt, schedule_hash=schedule_hash, document=document))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()    # this export was recorded before


def job_results(storage: Any, job: Job) -> Optional[dict[str, Any]]:
    """The job's study as a results document (`s3search.search.results_doc`), or None while it has no test
    scores (queued, running, stopped or failed before the test split)."""
    from s3search.search.results_doc import has_results, results_document

    try:
        study = optuna.load_study(study_name=job.study_name, storage=storage)
    except KeyError:
        return None
    return results_document(study) if has_results(study.user_attrs) else None
