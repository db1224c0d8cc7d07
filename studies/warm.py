"""Warm starts of service jobs: what a request names (its owner's job ids, a saved predictor's name) checked at
submission, and turned by the runner into what the search reads (study names in the service's own storage, the
predictor's folder). A request never names a study, a storage or a path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from sqlalchemy.orm import Session

import predictors
from s3search.search.options import WarmStart

from . import jobs as repo

__all__ = ["PREDICTORS_DIR_ENV", "predictors_dir", "unknown_jobs", "predictor_problem", "resolve"]

PREDICTORS_DIR_ENV = "S3S_PREDICTORS_DIR"


def predictors_dir() -> Optional[str]:
    """The server's folder of saved predictors (the environment the API's settings read as well)."""
    return os.environ.get(PREDICTORS_DIR_ENV, "").strip() or None


def unknown_jobs(session: Session, owner: str, job_ids: tuple[str, ...]) -> list[int]:
    """Indices of the ids that are not jobs of `owner` (another owner's job is as unknown as a missing one)."""
    return [i for i, job_id in enumerate(job_ids) if repo.get_job(session, job_id, owner) is None]


def predictor_problem(root: Optional[str], name: str) -> Optional[str]:
    """Why `name` is not a predictor saved in `root`, or None when it is."""
    if root is None:
        return f"predictor={name!r}: this server has no saved predictors ({PREDICTORS_DIR_ENV} is not set)"
    try:
        predictors.saved_path(root, name)
    except ValueError as e:
        return str(e)
    return None


def resolve(session: Session, owner: str, spec: WarmStart, root: Optional[str]) -> WarmStart:
    """The warm start with its jobs as their study names (storage: the job's own, the service's) and its
    predictor as its folder; ValueError when a job or the predictor has gone since submission."""
    studies = list(spec.studies)
    for i, job_id in enumerate(spec.jobs):
        job = repo.get_job(session, job_id, owner)
        if job is None:
            raise ValueError(f"options.warm_start.jobs[{i}]: job {job_id} is not there any more")
        studies.append(job.study_name)
    path = spec.predictor_path
    if spec.predictor is not None:
        problem = predictor_problem(root, spec.predictor)
        if problem:
            raise ValueError(f"options.warm_start.predictor: {problem}")
        path = str(Path(str(root)) / spec.predictor)
    return dataclasses.replace(spec, studies=tuple(dict.fromkeys(studies)), predictor_path=path)
