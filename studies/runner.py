"""The runner: claims queued jobs from the database and runs their search, one at a time.

Several runners may share a database; `studies.jobs.claim_next` makes each claim exclusive. While a job runs, a
heartbeat thread keeps the claim alive; a runner that dies stops heartbeating and the next runner to look
re-claims the job and resumes it: the job's Optuna study keeps every finished trial, and the search reuses them.

Fencing: the job row is written only under the claim token (`studies.jobs`), and the study only through a
`FencedStorage` holding the same token, so a runner that lost its claim (frozen past `stale_after_s`, then woken)
writes nothing more to either: its next write raises `ClaimLost`, and it drops the job silently. Settling: when a
search ends (succeeded, failed, cancelled) the runner ends the trials still WAITING or RUNNING before it
finishes the job, so a final job's study holds only trials its result accounts for.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import optuna
from sqlalchemy.exc import SQLAlchemyError

from s3search.evaluation.base import Evaluator
from s3search.search.config import Progress, SearchConfig, SearchResult
from s3search.search.study import settle
from s3search.search.study_note import publish_study_note

from . import jobs as repo
from .db import make_engine, make_session_factory
from .fenced_storage import Claim, ClaimLost, FencedStorage, claim_lost_in, fenced_storage
from .migrate import upgrade
from .models import Job
from .warm import predictors_dir, resolve

__all__ = ["RunnerOptions", "Runner", "config_from_spec", "SearchFn", "evaluator_factory"]

log = logging.getLogger("studies.runner")

SearchFn = Callable[..., SearchResult]     # run_search(config, study, *, evaluator, progress, should_stop)
EvaluatorFactory = Callable[[SearchConfig], Optional[Evaluator]]


def _default_search() -> SearchFn:
    from s3search.search.run import run_search
    return run_search


def evaluator_factory(kind: str, sessions: Any = None) -> EvaluatorFactory:
    """Evaluators for the runner: "local" (in this process) or "ray" (RAY_ADDRESS, else embedded Ray), behind
    the database's evaluation cache when `sessions` is given (the same candidate is never paid twice, across
    jobs and runners)."""
    if kind not in ("local", "ray"):
        raise ValueError(f"evaluator={kind!r} must be local or ray")

    def make(config: SearchConfig) -> Evaluator:
        from s3search.search.run import default_evaluator

        options = config.options
        if kind == "ray":
            from s3search.distributed import RayEvaluator
            inner: Evaluator = RayEvaluator(factory_kwargs=dict(options.evaluator))
        else:
            inner = default_evaluator(options)
        if sessions is None:
            return inner
        from .cache import CachedEvaluator
        return CachedEvaluator(inner, sessions)

    return make


def config_from_spec(spec: dict[str, Any]) -> SearchConfig:
    """The job spec the API stored (`SearchConfig.to_dict`, checked at submission) as the search's config."""
    return SearchConfig.from_dict(spec)


def _resolved(config: SearchConfig, job: Job, sessions: Any, root: Optional[str]) -> SearchConfig:
    """The config with its warm start's job ids and predictor name turned into study names and a folder."""
    spec = config.options.warm_start
    if spec is None or not (spec.jobs or spec.predictor):
        return config
    with sessions() as s:
        warm = resolve(s, job.owner, spec, root)
    return dataclasses.replace(config, options=config.options.replace(warm_start=warm))


def _finite(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _fraction(x: Any) -> Optional[float]:
    """A progress fraction as stored: finite, within [0, 1], else None (a search that reports none)."""
    f = _finite(x)
    return None if f is None else min(1.0, max(0.0, f))


@dataclass(frozen=True)
class RunnerOptions:
    heartbeat_interval_s: float = 5.0
    stale_after_s: float = 60.0
    poll_interval_s: float = 1.0
    max_attempts: int = 3
    # Where warm starts' saved predictors are (None: the environment's S3S_PREDICTORS_DIR).
    predictors_dir: Optional[str] = None


class Runner:
    def __init__(self, database_url: Optional[str] = None, *, runner_id: Optional[str] = None,
                 options: RunnerOptions = RunnerOptions(), search_fn: Optional[SearchFn] = None,
                 evaluator_factory: Optional[EvaluatorFactory] = None, migrate: bool = True):
        self.engine = make_engine(database_url)
        if migrate:
            upgrade(self.engine)
        self.database_url = self.engine.url.render_as_string(hide_password=False)
        self.sessions = make_session_factory(self.engine)
        self.runner_id = runner_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.options = options
        self.search_fn = search_fn
        self.evaluator_factory = evaluator_factory
        self.shutdown = threading.Event()     # set by SIGTERM: stop the current search, give the job back

    # ----- the loop ----------------------------------------------------------------------------------------
    def run_forever(self, max_jobs: Optional[int] = None) -> int:
        done = 0
        while not self.shutdown.is_set() and (max_jobs is None or done < max_jobs):
            if self.run_once() is None:
                self.shutdown.wait(self.options.poll_interval_s)
            else:
                done += 1
        return done

    def run_once(self) -> Optional[str]:
        """Claim and run one job; its id, or None when nothing was claimable."""
        try:
            with self.sessions() as s:
                job = repo.claim_next(s, self.runner_id, stale_after_s=self.options.stale_after_s,
                                      max_attempts=self.options.max_attempts)
        except SQLAlchemyError:
            # The database is busy or away (SQLite locked by a frozen process, PostgreSQL restarting): the loop
            # asks again after its poll interval instead of ending the runner.
            log.exception("runner %s: could not claim a job", self.runner_id)
            return None
        if job is None:
            return None
        self._run_job(job)
        return job.id

    def close(self) -> None:
        self.engine.dispose()

    # ----- one job -----------------------------------------------------------------------------------------
    def storage(self, job: Job) -> FencedStorage:
        """The job's study storage, fenced by its claim: one per job, so no claim outlives its job."""
        assert job.claim_token is not None
        return fenced_storage(self.database_url, Claim(job.id, job.claim_token),
                              idle_timeout_s=max(10.0, self.options.stale_after_s))

    def _run_job(self, job: Job) -> None:
        token = job.claim_token
        assert token is not None
        log.info("runner %s: job %s (attempt %d)", self.runner_id, job.id, job.attempts)
        lost = threading.Event()
        stop_heartbeat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, token, lost, stop_heartbeat), daemon=True,
                                name=f"heartbeat-{job.id[:8]}")
        beat.start()
        try:
            self._search(job, token, lost)
        finally:
            stop_heartbeat.set()
            beat.join()

    def _heartbeat(self, job_id: str, token: str, lost: threading.Event, stop: threading.Event) -> None:
        while not stop.wait(self.options.heartbeat_interval_s):
            try:
                with self.sessions() as s:
                    state = repo.heartbeat(s, job_id, token)
            except Exception:  # noqa: BLE001 - a database hiccup: try again next beat
                log.exception("heartbeat failed")
                continue
            if not state.owned:
                lost.set()
                return

    def _search(self, job: Job, token: str, lost: threading.Event) -> None:
        self._evaluator: Any = None
        storage = self.storage(job)
        try:
            self._search_inner(job, token, lost, storage)
        except Exception as e:
            if not claim_lost_in(e):
                raise
            # Nothing was written after the loss (the storage rolled the write back); the new owner carries on.
            log.warning("job %s: claim lost (%s); another runner owns it now", job.id, e)
        finally:
            storage.engine.dispose()
            close = getattr(getattr(self._evaluator, "inner", self._evaluator), "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - releasing workers must not hide the job's outcome
                    log.exception("closing the evaluator failed")

    def _search_inner(self, job: Job, token: str, lost: threading.Event, storage: FencedStorage) -> None:
        cancelled = threading.Event()

        def should_stop() -> bool:
            if lost.is_set() or cancelled.is_set() or self.shutdown.is_set():
                return True
            try:
                with self.sessions() as s:
                    if repo.cancel_requested(s, job.id, token):
                        # Either a cancel, or the claim was lost; finish() below tells which by its fencing.
                        cancelled.set()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the search; ask again next time
                log.exception("could not read the cancel flag")
            return cancelled.is_set()

        def progress(p: Progress) -> None:
            best = p.best_schedule.to_dict() if p.best_schedule is not None else None
            try:
                with self.sessions() as s:
                    ok = repo.record_progress(s, job.id, token, evaluations=p.evaluations,
                                              best_value=_finite(p.best_value), best_schedule=best,
                                              message=p.message or "running", predictor_tau=_finite(p.predictor_tau),
                                              fraction=_fraction(getattr(p, "fraction", None)))
            except Exception:  # noqa: BLE001 - progress is advisory; the trials are in the study already
                log.exception("could not store progress")
                return
            if not ok:
                lost.set()

        evaluator = None
        study: Optional[optuna.Study] = None
        try:
            config = _resolved(config_from_spec(job.spec), job, self.sessions,
                               self.options.predictors_dir or predictors_dir())
            study = self._open_study(job, token, storage)
            evaluator = self.evaluator_factory(config) if self.evaluator_factory else None
            self._evaluator = evaluator
            search = self.search_fn or _default_search()
            result = search(config, study, evaluator=evaluator, progress=progress, should_stop=should_stop)
        except Exception as e:  # noqa: BLE001 - any failure ends the job with its reason
            if claim_lost_in(e) or lost.is_set():
                raise ClaimLost(job.id) from e
            if self.shutdown.is_set() and not cancelled.is_set():
                self._release(job.id, token)
                return
            status = "cancelled" if cancelled.is_set() else "failed"
            log.warning("job %s %s: %s", job.id, status, e)
            self._settle(study, job)
            self._finish(job, token, status, error=f"{type(e).__name__}: {e}", message=status)
            if status == "failed":
                log.debug("%s", traceback.format_exc())
            return
        if lost.is_set():
            raise ClaimLost(job.id)
        if self.shutdown.is_set() and not cancelled.is_set() and result.evaluations < config.budget:
            # The queue stays: the runner that resumes the job evaluates it first.
            self._release(job.id, token)
            return
        doc = _result_doc(result)
        status = "cancelled" if cancelled.is_set() else "succeeded"
        self._settle(study, job)
        self._finish(job, token, status, result=doc, message=status, best=(doc["best_value"], doc["best"]))
        self._note(study, job, doc)

    def _settle(self, study: Optional[optuna.Study], job: Job) -> None:
        """End the trials the search left WAITING or RUNNING (before the job is final, under the claim)."""
        if study is None:
            return
        try:
            n = settle(study)
        except Exception as e:  # noqa: BLE001 - a job that failed on a database error still ends failed
            if claim_lost_in(e):
                raise
            log.exception("job %s: could not settle its trials", job.id)
            return
        if n:
            log.info("job %s: %d trial(s) the search left unfinished were discarded", job.id, n)

    def _finish(self, job: Job, token: str, status: str, **kwargs: Any) -> None:
        with self.sessions() as s:
            if repo.finish(s, job.id, token, status, **kwargs):
                return
        # The fencing refused it: another runner re-claimed the job after this one's settle.
        raise ClaimLost(job.id)

    def _release(self, job_id: str, token: str) -> None:
        with self.sessions() as s:
            repo.release(s, job_id, token, message="released by a runner shutting down; will resume")

    def _open_study(self, job: Job, token: str, storage: FencedStorage) -> optuna.Study:
        study = optuna.create_study(study_name=job.study_name, storage=storage, direction="minimize",
                                    load_if_exists=True)
        # Trials a dead runner left RUNNING are the search's to settle: its Ledger ends them FAIL and re-queues
        # their schedules (the claim fencing guarantees that runner can no longer write to this job, nor to its
        # study).
        if job.attempts == 1 or "job_id" not in study.user_attrs:
            study.set_user_attr("job_id", job.id)
            study.set_user_attr("spec", job.spec)
            self._note(study, job, None)
        with self.sessions() as s:
            repo.set_study_id(s, job.id, token, study._study_id)
        return study

    @staticmethod
    def _note(study: optuna.Study, job: Job, result: Optional[dict[str, Any]]) -> None:
        """The dashboard's note for the study (the builder the CLI uses too): the job's config and spec and,
        once known, each NFE's winner and the test split's table of the baselines."""
        try:
            publish_study_note(study, job.spec, result, title=f"s3search job `{job.id}`", spec=job.spec)
        except Exception as e:  # noqa: BLE001 - the note is a convenience; never fail a job for it
            if claim_lost_in(e):
                raise
            log.exception("could not save the dashboard note")


def _one_result(result: SearchResult) -> dict[str, Any]:
    return {"best": result.best.to_dict(), "best_value": _finite(result.best_value),
            "test_value": _finite(result.test_value),
            "validation_value": _finite(result.validation_value),
            "baselines": {str(k): _finite(v) for k, v in result.baselines.items()},
            "evaluations": int(result.evaluations),
            "test_extras": {str(k): {str(m): _finite(v) for m, v in row.items()}
                            for k, row in (getattr(result, "test_extras", None) or {}).items()}}


def _result_doc(result: SearchResult) -> dict[str, Any]:
    """The job's stored result: the first NFE's figures at the top, every NFE's under `per_nfe`."""
    doc = _one_result(result)
    per_nfe = getattr(result, "per_nfe", None) or {}
    doc["per_nfe"] = {str(n): _one_result(r) for n, r in sorted(per_nfe.items())}
    doc["stopped"] = bool(getattr(result, "stopped", False))
    return doc
