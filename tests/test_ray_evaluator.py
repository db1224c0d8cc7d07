"""The Ray evaluation path, on a real embedded Ray (one start-up for the whole module)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from s3search.distributed import RayEvaluator, RaySettings  # noqa: E402
from s3search.distributed.ray_evaluator import EvalActorCore  # noqa: E402
from s3search.distributed.toy import ToyEvaluator, toy_score  # noqa: E402
from s3search.evaluation.base import EvalRequest  # noqa: E402
from s3search.schedule import SolverSchedule, StepSpec  # noqa: E402

TOY = "s3search.distributed.toy:ToyEvaluator"
REQUEST = EvalRequest(model="toy", metric="toy", n_samples=8, seed=11)


def schedule(k: int, name: str = "") -> SolverSchedule:
    """Distinct valid EDM schedules: k moves the interior times and the orders."""
    n = 4
    ts = [80.0 * (0.002 / 80.0) ** ((i / n) ** (1 + 0.1 * k)) for i in range(n + 1)]
    steps = [StepSpec(order=min(1 + i, 1 + k % 3)) for i in range(n)]
    return SolverSchedule(process="edm", timesteps=tuple(ts), steps=tuple(steps), name=name or f"c{k}")


@pytest.fixture(scope="module")
def ray_session():
    # Start-up is slow on a busy 2-core machine; one embedded Ray for all tests here. Four logical CPUs for two
    # actors: after tests that kill actors, Ray has been seen holding one CPU lease it never returned, and with
    # exactly two the next test's second actor then waited forever to be placed (every test that starts actors
    # fixes their number with max_in_flight, so the spare logical CPUs change nothing else).
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def read_log(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        event, pid, *rest = line.split(" ", 2)
        rows.append((event, int(pid), rest[0].split("@")[0] if rest else ""))
    return rows


# ----- settings, no Ray needed --------------------------------------------------------------------------------

def test_settings_from_env_and_validation():
    s = RaySettings.from_env({"RAY_ADDRESS": "head:6379", "S3SEARCH_RAY_GPUS_PER_EVAL": "0.5",
                              "S3SEARCH_RAY_MAX_IN_FLIGHT": "3", "S3SEARCH_RAY_MAX_RETRIES": "1"})
    assert (s.address, s.gpus_per_eval, s.max_in_flight, s.max_retries) == ("head:6379", 0.5, 3, 1)
    assert RaySettings.from_env({}).address is None
    with pytest.raises(ValueError, match="S3SEARCH_RAY_MAX_IN_FLIGHT"):
        RaySettings.from_env({"S3SEARCH_RAY_MAX_IN_FLIGHT": "two"})
    with pytest.raises(ValueError, match="max_retries"):
        RaySettings(max_retries=-1)
    with pytest.raises(ValueError, match="cpus_per_eval"):
        RaySettings(cpus_per_eval=0)
    # Actors that fit: CPUs / cpus_per_eval, and GPUs bound it when evaluations need GPUs.
    assert RaySettings(cpus_per_eval=2).actors_for({"CPU": 16}) == 8
    assert RaySettings(gpus_per_eval=1).actors_for({"CPU": 16, "GPU": 4}) == 4
    assert RaySettings(max_in_flight=3).actors_for({"CPU": 16}) == 3


def test_actor_core_isolates_a_raising_candidate_without_ray():
    core = EvalActorCore(TOY, '{"raise_on": ["c1"], "nan_on": ["c2"]}', 1)
    import json
    doc = json.loads(core.evaluate_json([schedule(k).to_json() for k in range(4)], '{"model": "toy", '
                                        '"metric": "toy", "n_samples": 8, "seed": 11}'))
    res = doc["results"]
    assert [r["error"] is None for r in res] == [True, False, False, True]
    assert "toy failure" in res[1]["error"] and "NaN" in res[2]["error"]
    assert res[1]["value"] == math.inf and res[2]["value"] == math.inf
    assert res[3]["value"] == pytest.approx(toy_score(schedule(3), 11), rel=0, abs=0)


# ----- on Ray -----------------------------------------------------------------------------------------------

def test_same_results_as_local_and_model_loaded_once_per_actor(ray_session, tmp_path):
    log = tmp_path / "log.txt"
    cands = [schedule(k) for k in range(7)]
    local = ToyEvaluator().evaluate(cands, REQUEST)
    settings = RaySettings(max_in_flight=2, batch_size=2)
    with RayEvaluator(settings, factory=TOY, factory_kwargs={"log_path": str(log)}) as ev:
        first = ev.evaluate(cands, REQUEST)
        second = ev.evaluate(cands[:3], REQUEST)
        assert ev.num_actors == 2
    assert [(r.schedule_hash, r.value, r.nfe, r.error) for r in first] == \
           [(r.schedule_hash, r.value, r.nfe, r.error) for r in local]
    assert [r.value for r in second] == [r.value for r in local[:3]]
    events = read_log(log)
    loads = [pid for e, pid, _ in events if e == "load"]
    starts = [pid for e, pid, _ in events if e == "start"]
    assert len(loads) == 2 and len(set(loads)) == 2, "one model load per actor, not per candidate"
    assert len(starts) == 10 and set(starts) == set(loads)


def test_batches_shrink_at_the_end_and_the_trace_covers_every_task(ray_session):
    cands = [schedule(k) for k in range(20)]
    with RayEvaluator(RaySettings(max_in_flight=2, batch_size=6), factory=TOY,
                      factory_kwargs={"sleep_s": 0.01}) as ev:
        res = ev.evaluate(cands, REQUEST)
        assert ray.get([a.torch_threads.remote() for a in ev._actors]) == [1, 1]
    assert [r.value for r in res] == [toy_score(c, REQUEST.seed) for c in cands]
    trace = list(ev.stats.trace)
    assert sorted(t.size for t in trace) == sorted([6, 6, 4, 2, 1, 1])
    assert {t.actor for t in trace} == {0, 1}
    for t in trace:   # one host: the four stamps are in order
        assert t.submitted <= t.started <= t.finished <= t.received


def test_failing_candidate_becomes_an_error_result_and_others_survive(ray_session):
    cands = [schedule(k) for k in range(5)]
    with RayEvaluator(RaySettings(max_in_flight=1, batch_size=3), factory=TOY,
                      factory_kwargs={"raise_on": ["c1"], "nan_on": ["c4"]}) as ev:
        res = ev.evaluate(cands, REQUEST)
    assert [r.ok for r in res] == [True, False, True, True, False]
    assert "RuntimeError: toy failure" in res[1].error and "NaN" in res[4].error
    assert res[1].value == math.inf
    assert [r.value for r in res if r.ok] == [toy_score(cands[k], REQUEST.seed) for k in (0, 2, 3)]


def kill_first_start(log: Path, killed: list[int], deadline_s: float = 120.0) -> None:
    """SIGKILL the first worker process seen starting an evaluation (the toy sleeps, so it is mid-evaluation)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        starts = [pid for e, pid, _ in read_log(log) if e == "start"]
        if starts:
            os.kill(starts[0], signal.SIGKILL)
            killed.append(starts[0])
            return
        time.sleep(0.05)


def test_hung_evaluation_times_out_as_an_error_result(ray_session):
    with RayEvaluator(RaySettings(max_in_flight=1, batch_size=1, max_retries=0, timeout_s=1.0), factory=TOY,
                      factory_kwargs={"sleep_s": 30.0}) as ev:
        ev.start()
        ray.get(ev._actors[0].ping.remote(), timeout=120)   # the deadline should not include actor start-up
        t0 = time.monotonic()
        res = ev.evaluate([schedule(0)], REQUEST)
        assert time.monotonic() - t0 < 20
        assert ev.stats.timeouts == 1
    assert not res[0].ok and "timed out" in res[0].error and res[0].value == math.inf


def test_bad_factories_and_impossible_resources_are_reported(ray_session):
    with pytest.raises(ValueError, match="factory"):
        RayEvaluator(factory="s3search.distributed.toy:NoSuchThing")
    with pytest.raises(ValueError, match="gpus_per_eval"):
        RayEvaluator(RaySettings(gpus_per_eval=1), factory=TOY).start()
    # An evaluator whose constructor raises inside the worker: every candidate fails with the reason.
    with RayEvaluator(RaySettings(max_in_flight=1, max_retries=0), factory=TOY,
                      factory_kwargs={"sleep_s": -1.0}) as ev:
        res = ev.evaluate([schedule(0)], REQUEST)
    assert not res[0].ok and "sleep_s=-1.0 must be" in res[0].error


@pytest.mark.slow   # four worker restarts: ~15 s on a busy 2-core machine
def test_candidate_that_always_kills_its_worker_fails_alone(ray_session, tmp_path):
    # A worker killed on every attempt at c1: c1 ends as an error, its batch-mate still scores. max_retries=0
    # keeps the number of (slow) worker restarts down; the retry itself is covered by the test above.
    log = tmp_path / "log.txt"
    cands = [schedule(k) for k in range(2)]
    stop = threading.Event()

    def killer() -> None:
        seen: set[tuple[int, str]] = set()
        while not stop.is_set():
            for e, pid, name in read_log(log):
                if e == "start" and name == "c1" and (pid, name) not in seen:
                    seen.add((pid, name))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    try:
        with RayEvaluator(RaySettings(max_in_flight=1, batch_size=2, max_retries=0), factory=TOY,
                          factory_kwargs={"log_path": str(log), "sleep_s": 0.3}) as ev:
            res = ev.evaluate(cands, REQUEST)
    finally:
        stop.set()
        t.join()
    assert [r.ok for r in res] == [True, False]
    assert "worker lost" in res[1].error
    starts = [name for e, _, name in read_log(log) if e == "start"]
    assert starts == ["c0", "c1", "c0", "c1"], "the batch once, then each candidate on its own"

    assert res[0].value == toy_score(cands[0], REQUEST.seed)


# ----- s3search worker (argument building only: a real `ray start` would join this machine's shared Ray) ------

def test_worker_command_builds_ray_start_lines():
    import typer
    from typer.testing import CliRunner

    from s3search.cli.worker_cmd import ray_start_argv, register

    assert ray_start_argv(address="10.0.0.5:6379", head=False, num_gpus=1) == [
        "start", "--disable-usage-stats", "--address=10.0.0.5:6379", "--num-gpus=1", "--block"]
    head = ray_start_argv(address=None, head=True, port=6380, block=False)
    assert "--head" in head and "--port=6380" in head and "--block" not in head
    assert "--dashboard-host=127.0.0.1" in head
    for bad in ({"address": None, "head": False}, {"address": "h:1", "head": True},
                {"address": "nohostport", "head": False}):
        with pytest.raises(ValueError, match="address"):
            ray_start_argv(**bad)

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)   # a second command keeps typer from collapsing the group
    out = CliRunner().invoke(app, ["worker", "--address", "head:6379", "--num-cpus", "4", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "start --disable-usage-stats --address=head:6379 --num-cpus=4 --block" in out.output
    bad = CliRunner().invoke(app, ["worker", "--dry-run"])
    assert bad.exit_code != 0


def test_adaptive_batch_size_targets_about_a_second_per_task():
    ev = RayEvaluator(RaySettings(max_in_flight=2), factory=TOY)
    ev._actors = [object(), object()]            # sizing only; nothing is sent to Ray here
    assert ev.batch_size_for(40) == 1            # nothing timed yet: one candidate per task
    ev.stats.recent_seconds.extend([4.0] + [0.05] * 9)   # 50 ms per evaluation after a slow first -> 20
    assert ev.batch_size_for(100) == 20
    assert ev.batch_size_for(10) == 5            # never more than an even share per actor
    ev.stats.recent_seconds.extend([3.0] * 32)   # 3 s per evaluation -> one per task
    assert ev.batch_size_for(100) == 1
    assert RayEvaluator(RaySettings(batch_size=7), factory=TOY).batch_size_for(100) == 7


# ----- the search loop on Ray ------------------------------------------------------------------------------

LOCAL = "s3search.evaluation.local:LocalEvaluator"


def search_config(**over):
    from s3search.search.config import SearchConfig

    base = dict(model="gmm-8x4", nfe=(4,), metric="fd", n_samples=200, n_test_samples=200, budget=12, seed=3,
                options={"batch_size": 4, "population": 32, "children": 32, "generations": 2, "init_random": 4,
                         "test_baselines": False})
    base.update(over)
    return SearchConfig(**base)


def new_study(name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize", study_name=name)


def trial_rows(study) -> list[tuple]:
    return [(t.number, t.state.name, t.value, t.user_attrs.get("schedule_hash"), t.user_attrs.get("baseline"))
            for t in study.get_trials(deepcopy=False)]


def started_hashes(path: Path, split: str = "search") -> list[str]:
    """Hashes of the evaluations started on `split` (the search ends with a test-split run of the winner)."""
    details = [line.split(" ", 2)[2].split("@") for line in path.read_text().splitlines() if line.startswith("start ")]
    return [h for _, h, sp in details if sp == split]


def test_search_on_ray_gives_the_same_trials_as_the_local_path(ray_session):
    from s3search.evaluation.local import LocalEvaluator
    from s3search.search.run import run_search

    cfg = search_config()
    local_study, ray_study = new_study("local"), new_study("ray")
    local = run_search(cfg, local_study, evaluator=LocalEvaluator())
    with RayEvaluator(RaySettings(max_in_flight=2), factory=LOCAL) as ev:
        on_ray = run_search(cfg, ray_study, evaluator=ev)
        assert len(ev.stats.pids) == 2
    rows = trial_rows(ray_study)
    assert len(rows) == cfg.budget and all(r[1] == "COMPLETE" for r in rows)
    assert rows == trial_rows(local_study)
    assert (on_ray.best_value, on_ray.test_value) == (local.best_value, local.test_value)


def test_search_survives_a_killed_worker_and_records_a_failing_candidate(ray_session, tmp_path):
    from s3search.search.run import run_search

    log = tmp_path / "log.txt"
    cfg = search_config()
    study = new_study("faults")
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_start, args=(log, killed))
    killer.start()
    # One candidate per task, so the log counts evaluations exactly (a raising candidate in a larger batch
    # makes the actor re-run its batch-mates one by one to isolate it).
    with RayEvaluator(RaySettings(max_in_flight=2, max_retries=2, batch_size=1), factory=TOY,
                      factory_kwargs={"log_path": str(log), "sleep_s": 0.2, "raise_on": ["dpmpp_2m"]}) as ev:
        run_search(cfg, study, evaluator=ev)
    killer.join()
    assert len(killed) == 1
    loads = [pid for e, pid, _ in read_log(log) if e == "load"]
    assert len(loads) == 3 and killed[0] in loads[:2], "two actors, and one restart of the killed one"
    trials = study.get_trials(deepcopy=False)
    hashes = [t.user_attrs["schedule_hash"] for t in trials]
    assert len(trials) == cfg.budget and len(set(hashes)) == cfg.budget, "no trial lost or duplicated"
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.user_attrs["baseline"].split("@")[0] for t in failed] == ["dpmpp_2m"]
    assert "RuntimeError: toy failure" in failed[0].user_attrs["error"]
    assert all(t.state.name == "COMPLETE" for t in trials if t not in failed)
    # The killed evaluation was started again in the restarted process, and nothing else ran twice.
    starts = started_hashes(log)
    assert sorted(set(starts)) == sorted(hashes)
    assert len(starts) == len(hashes) + 1
    twice = [h for h in set(starts) if starts.count(h) == 2]
    pids = [pid for e, pid, detail in read_log(log) if e == "start"]
    assert pids[0] == killed[0] and starts[0] == twice[0] and loads[2] in pids


def test_interrupted_search_resumes_without_re_evaluating(ray_session, tmp_path):
    from s3search.search.run import run_search

    log = tmp_path / "log.txt"
    cfg = search_config(budget=14)
    study = new_study("resume")
    kwargs = {"log_path": str(log)}
    with RayEvaluator(RaySettings(max_in_flight=1), factory=TOY, factory_kwargs=kwargs) as ev:
        # Stop once 6 trials have ended (the baselines' queued WAITING trials are not evaluations).
        run_search(cfg, study, evaluator=ev, should_stop=lambda: sum(
            t.state.name in ("COMPLETE", "FAIL") for t in study.get_trials(deepcopy=False)) >= 6)
    first = started_hashes(log)
    assert 0 < len(first) < cfg.budget
    # A new evaluator (new actors), as after a restart of the whole runner.
    with RayEvaluator(RaySettings(max_in_flight=1), factory=TOY, factory_kwargs=kwargs) as ev:
        run_search(cfg, study, evaluator=ev)
    # (run_search may leave WAITING trials queued beyond the budget; they were never evaluated.)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]
    assert len(done) == cfg.budget and all(t.state.name == "COMPLETE" for t in done)
    starts = started_hashes(log)
    assert starts[:len(first)] == first
    assert len(starts) == len(set(starts)) == cfg.budget, "no stored trial evaluated again"
    assert sorted(starts) == sorted(t.user_attrs["schedule_hash"] for t in done)


def test_gpu_settings_put_the_local_evaluator_on_cuda():
    import json

    gpu = RayEvaluator(RaySettings(gpus_per_eval=1), factory=LOCAL)
    assert json.loads(gpu.factory_kwargs_json) == {"device": "cuda"}
    assert json.loads(RayEvaluator(RaySettings(), factory=LOCAL).factory_kwargs_json) == {}
    assert json.loads(RayEvaluator(RaySettings(gpus_per_eval=1), factory=LOCAL,
                                   factory_kwargs={"device": "cuda:0"}).factory_kwargs_json) == {"device": "cuda:0"}
    # The toy evaluator takes no device: nothing is added.
    assert json.loads(RayEvaluator(RaySettings(gpus_per_eval=1), factory=TOY).factory_kwargs_json) == {}
