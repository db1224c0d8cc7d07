"""The fenced study storage on SQLite and PostgreSQL: once a job is re-claimed, every write of the old claim's
storage raises ClaimLost and changes nothing; a write in flight at the re-claim is ordered before it."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sqlalchemy import event, update

from studies import jobs as repo
from studies.db import utcnow
from studies.fenced_storage import Claim, ClaimLost, claim_lost_in, fenced_storage
from studies.models import Job
from studies.optuna_storage import optuna_storage


def claimed(sessions, runner_id: str = "first") -> Job:
    with sessions() as s:
        repo.create_job(s, owner="o", spec={"model": "gmm-64d"}, budget=4)
        return repo.claim_next(s, runner_id)


def reclaim(sessions, job: Job) -> Job:
    """What a second runner does once the first stopped heartbeating: the job's claim moves to it."""
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
        s.commit()
        again = repo.claim_next(s, "second", stale_after_s=60)
    assert again is not None and again.id == job.id and again.claim_token != job.claim_token
    return again


def snapshot(url: str, study_name: str) -> tuple:
    storage = optuna_storage(url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        sid = study._study_id
        trials = [(t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.intermediate_values)
                  for t in study.get_trials()]
        return (trials, study.user_attrs, storage.get_study_system_attrs(sid),
                [s.study_name for s in storage.get_all_studies()])
    finally:
        storage.engine.dispose()


def test_every_write_after_the_claim_moved_raises_claim_lost_and_changes_nothing(db_url, sessions):
    job = claimed(sessions)
    storage = fenced_storage(db_url, Claim(job.id, job.claim_token))
    study = optuna.create_study(study_name=job.study_name, storage=storage, direction="minimize")
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    study.enqueue_trial({}, user_attrs={"schedule": "{}"})
    rid, sid = running._trial_id, study._study_id
    reclaim(sessions, job)
    before = snapshot(db_url, job.study_name)
    dist = FloatDistribution(0.0, 1.0)
    writes = {
        "ask (pops the WAITING trial)": lambda: study.ask(),
        "create_new_trial": lambda: storage.create_new_trial(sid),
        "enqueue_trial": lambda: study.enqueue_trial({"x": 0.5}),
        "tell": lambda: study.tell(running, 2.0),
        "set_trial_state_values": lambda: storage.set_trial_state_values(rid, TrialState.FAIL),
        "set_trial_param": lambda: storage.set_trial_param(rid, "x", 0.5, dist),
        "set_trial_user_attr": lambda: storage.set_trial_user_attr(rid, "k", 1),
        "set_trial_system_attr": lambda: storage.set_trial_system_attr(rid, "k", 1),
        "set_trial_intermediate_value": lambda: storage.set_trial_intermediate_value(rid, 0, 1.0),
        "set_study_user_attr": lambda: study.set_user_attr("k", 1),
        "set_study_system_attr": lambda: storage.set_study_system_attr(sid, "k", 1),
        "create_new_study": lambda: optuna.create_study(study_name="another", storage=storage),
        "delete_study": lambda: storage.delete_study(sid),
    }
    for name, write in writes.items():
        with pytest.raises(ClaimLost):
            write()
        assert snapshot(db_url, job.study_name) == before, name
    # Reads still answer (a stale runner may look; it may not write).
    assert len(study.get_trials()) == 3 and study.user_attrs == {}
    storage.engine.dispose()


def test_the_new_claim_writes_and_a_released_claim_does_not(db_url, sessions):
    job = claimed(sessions)
    mine = fenced_storage(db_url, Claim(job.id, job.claim_token))
    study = optuna.create_study(study_name=job.study_name, storage=mine)
    study.set_user_attr("first", 1)
    again = reclaim(sessions, job)
    theirs = fenced_storage(db_url, Claim(again.id, again.claim_token))
    optuna.load_study(study_name=job.study_name, storage=theirs).set_user_attr("second", 2)
    with sessions() as s:
        assert repo.release(s, again.id, again.claim_token)     # back to the queue: nobody holds it
    with pytest.raises(ClaimLost) as lost:
        optuna.load_study(study_name=job.study_name, storage=theirs).set_user_attr("third", 3)
    assert not claim_lost_in(RuntimeError("unrelated"))
    try:
        raise RuntimeError("the search gave up") from lost.value
    except RuntimeError as e:
        assert claim_lost_in(e)
    assert snapshot(db_url, job.study_name)[1] == {"first": 1, "second": 2}
    mine.engine.dispose()
    theirs.engine.dispose()


def test_a_write_in_flight_at_the_reclaim_commits_before_the_claim_moves(db_url, sessions):
    """Check and write are one transaction: a re-claim arriving between them waits for the COMMIT (SQLite: the
    database lock) or passes the job over (PostgreSQL: FOR SHARE against the claim's FOR UPDATE SKIP LOCKED),
    so the rescuer reads the write; the next write of the old claim is refused."""
    job = claimed(sessions)
    storage = fenced_storage(db_url, Claim(job.id, job.claim_token))
    study = optuna.create_study(study_name=job.study_name, storage=storage)
    checked, go_on = threading.Event(), threading.Event()

    def pause_at_commit(conn) -> None:       # after the fence check, before the COMMIT reaches the database
        if not go_on.is_set():
            checked.set()
            go_on.wait(30)

    with sessions() as s:        # the first runner looks dead from now on
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
        s.commit()
    event.listen(storage.engine, "commit", pause_at_commit)
    writer = threading.Thread(target=lambda: study.set_user_attr("in flight", True))
    writer.start()
    assert checked.wait(30)
    got: list = []

    def claim() -> None:
        with sessions() as s:
            got.append(repo.claim_next(s, "second", stale_after_s=60))

    claimer = threading.Thread(target=claim)
    claimer.start()
    time.sleep(0.5)
    # Either still waiting for the writer's transaction, or it found nothing claimable: never claimed under it.
    assert (claimer.is_alive() and not got) or got == [None]
    go_on.set()
    writer.join(30)
    claimer.join(30)
    if got == [None]:
        claim()
    assert got[-1] is not None and got[-1].runner_id == "second"
    assert snapshot(db_url, job.study_name)[1] == {"in flight": True}
    event.remove(storage.engine, "commit", pause_at_commit)
    with pytest.raises(ClaimLost):
        study.set_user_attr("late", True)
    storage.engine.dispose()
