"""Evaluate schedules on Ray: a pool of long-lived actors, each holding one local evaluator (and its models).

Why core actors and not Ray Tune: the S³ loop is batch-shaped (evaluate a population, refit the predictor,
evolve, evaluate the top k) and already keeps every trial in its Optuna study, which is also what resume reads.
Tune would add a second trial store and resume mechanism to keep consistent with the study, a Trainable per
trial (so a model load per trial unless actors are reused), and per-trial bookkeeping that costs more than a
small evaluation (bench/tune_overhead.py: ~30 ms per extra trial against ~1 ms per extra evaluation here). Actors give what the issue asks for directly: resources per evaluation, a bound on
evaluations in flight, a model loaded once per worker process, and bounded retries when a worker dies
(Ray restarts the actor and re-runs the batch).

What crosses the process boundary is text we produce: schedules and the request as JSON, results as JSON.
The evaluator inside an actor is named by a "module:callable" path from server configuration plus JSON-able
keyword arguments, never an object from a request.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

from ..evaluation.base import EvalRequest, EvalResult
from ..schedule import SolverSchedule
from .settings import ENV_PREFIX, RaySettings
from .trace import TaskTrace, next_batch_size

__all__ = ["RayEvaluator", "EvalActorCore", "DEFAULT_FACTORY", "load_factory", "ensure_ray"]

DEFAULT_FACTORY = "s3search.evaluation.local:LocalEvaluator"
TASK_TARGET_S = 1.0


# ----- the part that runs inside a worker process (kept free of Ray so it can be tested directly) -----------

def load_factory(path: str) -> Any:
    """Resolve "package.module:callable"."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"factory={path!r} must look like 'package.module:callable'")
    module_name, attr = path.split(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"factory={path!r} cannot be imported: {e}") from None
    if not callable(target):
        raise ValueError(f"factory={path!r} is not callable")
    return target


def schedule_from_json(text: str) -> Any:
    """A SolverSchedule, or a NamedSchedule (a named sampler on a grid) when the document names a sampler."""
    doc = json.loads(text)
    if isinstance(doc, dict) and "sampler" in doc:
        from ..named import NamedSchedule

        return NamedSchedule.from_dict(doc)
    return SolverSchedule.from_dict(doc)


def _request_from_json(text: str) -> EvalRequest:
    doc = json.loads(text)
    return EvalRequest(**doc)


def _result_to_dict(result: EvalResult) -> dict[str, Any]:
    doc = asdict(result)
    # A metric that came back NaN without an error is a failed evaluation (NaN samples): say so, keep +inf.
    if doc["error"] is None and isinstance(doc["value"], float) and math.isnan(doc["value"]):
        doc["error"] = "metric is NaN (the samples contain NaN or inf)"
    if doc["error"] is not None:
        doc["value"] = math.inf
    return doc


def _error_dict(schedule: Any, error: str, seconds: float = 0.0) -> dict[str, Any]:
    return asdict(EvalResult(schedule_hash=schedule.canonical_hash(), value=math.inf, nfe=schedule.nfe,
                             seconds=seconds, error=error))


def _accepts(target: Any, name: str) -> bool:
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _short(error: BaseException, limit: int = 400) -> str:
    """The exception's type and the start of its message (Ray's messages carry whole tracebacks)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    # The first line says what happened; the last one carries the original exception's message.
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _safe_hash(schedule: Any) -> str:
    try:
        return str(schedule.canonical_hash())
    except Exception:  # noqa: BLE001
        return f"invalid-{id(schedule):x}"


def _release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EvalActorCore:
    """One evaluator per process; batches in and out as JSON text."""

    def __init__(self, factory: str, factory_kwargs_json: str, num_threads: int) -> None:
        import os
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.pid = os.getpid()
        self.evaluator = load_factory(factory)(**json.loads(factory_kwargs_json))

    def _evaluate(self, schedules: list[Any], request: EvalRequest) -> list[dict[str, Any]]:
        results = self.evaluator.evaluate(schedules, request)
        if len(results) != len(schedules):
            raise RuntimeError(f"the evaluator returned {len(results)} results for {len(schedules)} schedules")
        return [_result_to_dict(r) for r in results]

    def evaluate_json(self, schedules_json: list[str], request_json: str) -> str:
        started = time.time()    # wall clock, to line up with the driver's stamps (trace.py)
        t0 = time.perf_counter()
        request = _request_from_json(request_json)
        schedules = [schedule_from_json(s) for s in schedules_json]
        try:
            out = self._evaluate(schedules, request)
        except Exception as batch_error:  # noqa: BLE001 - any failure of a candidate must become a FAIL result
            if len(schedules) == 1:
                out = [_error_dict(schedules[0], f"{type(batch_error).__name__}: {batch_error}")]
            else:
                # Find the candidate(s) that raised; the others keep their real scores.
                out = []
                for s in schedules:
                    t1 = time.perf_counter()
                    try:
                        out.extend(self._evaluate([s], request))
                    except Exception as e:  # noqa: BLE001
                        out.append(_error_dict(s, f"{type(e).__name__}: {e}", time.perf_counter() - t1))
        if any(r["error"] for r in out):
            _release_gpu_memory()      # after a CUDA out-of-memory, the next batch should start from a clean cache
        return json.dumps({"pid": self.pid, "seconds": time.perf_counter() - t0, "results": out,
                           "started": started, "finished": time.time()})

    def ping(self) -> int:
        return self.pid

    def torch_threads(self) -> int:
        """Intra-op threads: more than the CPUs reserved would contend with the other actors."""
        import torch

        return torch.get_num_threads()


# ----- the driver side ------------------------------------------------------------------------------------

def ensure_ray(settings: RaySettings) -> None:
    """Join RAY_ADDRESS, or start an embedded Ray; reuse a Ray this process already started."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.address:
        ray.init(address=settings.address, **kwargs)
    else:
        # address="local" makes an embedded instance even where RAY_ADDRESS was set to something empty.
        ray.init(address="local", num_cpus=settings.embedded_cpus or None,
                 num_gpus=None if settings.gpus_per_eval else 0, **kwargs)


_MAX_WAIT_S = 1.0


@dataclass
class _Job:
    indices: list[int]
    actor: int
    isolated: bool               # a single candidate re-run on its own after its batch kept killing workers
    deadline: float
    submitted_at: float          # wall clock, for the trace (trace.py)
    kills: int = 0


@dataclass
class RayStats:
    batches: int = 0
    evaluations: int = 0         # candidates scored inside the evaluators (timed ones, for batch sizing)
    worker_losses: int = 0       # batches whose retries ran out (Ray's own restarts are invisible here)
    timeouts: int = 0
    eval_seconds: float = 0.0    # time inside the evaluators
    wall_seconds: float = 0.0    # time in evaluate() on the driver
    pids: set[int] = field(default_factory=set)
    recent_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=32))   # per candidate
    trace: deque[TaskTrace] = field(default_factory=lambda: deque(maxlen=4096))      # recent tasks (trace.py)


class RayEvaluator:
    """`Evaluator` on a Ray pool. Results come back in the order given, one per schedule, exactly once."""

    def __init__(self, settings: Optional[RaySettings] = None, factory: str = DEFAULT_FACTORY,
                 factory_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        self.settings = settings or RaySettings.from_env()
        target = load_factory(factory)      # a bad path fails here, not inside every worker
        kwargs = dict(factory_kwargs or {})
        if self.settings.gpus_per_eval > 0 and "device" not in kwargs and _accepts(target, "device"):
            # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, so "cuda" is that GPU.
            kwargs["device"] = "cuda"
        self.factory = factory
        self.factory_kwargs_json = json.dumps(kwargs)   # also checks they are JSON-able
        self.stats = RayStats()
        self._actors: list[Any] = []
        self._actor_class: Any = None

    # -- pool --
    def _make_actor(self) -> Any:
        import ray

        if self._actor_class is None:
            s = self.settings
            self._actor_class = ray.remote(
                num_cpus=s.cpus_per_eval, num_gpus=s.gpus_per_eval,
                max_restarts=s.max_retries, max_task_retries=s.max_retries,
            )(EvalActorCore)
        threads = max(1, int(self.settings.cpus_per_eval))
        return self._actor_class.remote(self.factory, self.factory_kwargs_json, threads)

    def start(self) -> "RayEvaluator":
        import ray

        if not self._actors:
            ensure_ray(self.settings)
            resources = ray.cluster_resources()
            # An actor the cluster can never place would wait forever: say so now instead.
            for key, need, name in (("CPU", self.settings.cpus_per_eval, "cpus_per_eval"),
                                    ("GPU", self.settings.gpus_per_eval, "gpus_per_eval")):
                if need > resources.get(key, 0):
                    raise ValueError(f"{name}={need:g} but the Ray cluster has {resources.get(key, 0):g} {key}s "
                                     f"(set {ENV_PREFIX}{name.upper()} or add nodes with `s3search worker`)")
            n = self.settings.actors_for(resources)
            self._actors = [self._make_actor() for _ in range(n)]
        return self

    def _replace_actor(self, i: int) -> None:
        import ray

        try:
            ray.kill(self._actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        self._actors[i] = self._make_actor()

    def close(self) -> None:
        import ray

        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors = []

    def __enter__(self) -> "RayEvaluator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    # -- evaluation --
    def batch_size_for(self, n: int) -> int:
        """The most candidates per task: the setting, else enough for about TASK_TARGET_S of work per task.

        Ray costs a few milliseconds per task, so a ~1 s task keeps it under 1%; smaller batches keep the
        workers evenly loaded. Until an evaluation has been timed, one candidate per task. evaluate() sends
        smaller tasks as the queue drains (trace.next_batch_size) so the actors finish together.
        """
        if self.settings.batch_size:
            return self.settings.batch_size
        recent = sorted(self.stats.recent_seconds)
        if not recent:
            return 1
        # The median of recent candidates: the first evaluation of a model also pays for reference statistics.
        mean = max(recent[len(recent) // 2], 1e-6)
        per_actor = math.ceil(n / max(1, len(self._actors)))
        return max(1, min(per_actor, math.ceil(TASK_TARGET_S / mean)))

    def evaluate(self, schedules: Sequence[Any], request: EvalRequest) -> list[EvalResult]:
        """Score SolverSchedules and NamedSchedules (anything with to_json / canonical_hash / nfe)."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        t_start = time.perf_counter()
        if not schedules:
            return []
        self.start()
        request_json = json.dumps(asdict(request))
        results: list[Optional[dict[str, Any]]] = [None] * len(schedules)
        texts: list[str] = []
        for i, s in enumerate(schedules):
            try:
                texts.append(s.to_json())
            except Exception as e:  # noqa: BLE001 - not a schedule we can send: a failed candidate
                texts.append("")
                results[i] = {"schedule_hash": _safe_hash(s), "value": math.inf, "nfe": -1, "seconds": 0.0,
                              "error": f"schedule cannot be serialised: {type(e).__name__}: {e}", "extras": {}}
        todo: deque[int] = deque(i for i in range(len(schedules)) if results[i] is None)
        cap = self.batch_size_for(len(todo))
        # Candidates re-run one by one after their batch kept killing workers; they go before the rest.
        queue: deque[tuple[list[int], bool]] = deque()
        idle = list(range(len(self._actors)))
        pending: dict[Any, _Job] = {}
        timeout = self.settings.timeout_s

        def next_job() -> tuple[list[int], bool]:
            if queue:
                return queue.popleft()
            size = next_batch_size(len(todo), cap, len(self._actors))
            return [todo.popleft() for _ in range(size)], False

        def submit(indices: list[int], isolated: bool) -> None:
            a = idle.pop()
            submitted_at = time.time()
            ref = self._actors[a].evaluate_json.remote([texts[i] for i in indices], request_json)
            deadline = time.monotonic() + timeout * len(indices) if timeout else math.inf
            pending[ref] = _Job(indices, a, isolated, deadline, submitted_at)
            self.stats.batches += 1

        def give_up(job: _Job, why: str) -> None:
            # The batch kept killing its worker: try its candidates one by one, then fail the one that still does.
            self.stats.worker_losses += 1
            self._replace_actor(job.actor)
            if len(job.indices) > 1 and not job.isolated:
                queue.extendleft(([i], True) for i in reversed(job.indices))
            else:
                for i in job.indices:
                    results[i] = _error_dict(schedules[i], why)

        while queue or todo or pending:
            while (queue or todo) and idle:
                submit(*next_job())
            # Never an unbounded wait: ray.wait blocks in C, where neither Ctrl-C nor a test timeout can reach the
            # driver; waking once a second costs nothing and returns at once when a result is ready.
            wait_s = _MAX_WAIT_S
            if timeout:
                wait_s = min(wait_s, max(0.0, min(j.deadline for j in pending.values()) - time.monotonic()))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            for ref in ready:
                received_at = time.time()
                job = pending.pop(ref)
                try:
                    doc = json.loads(ray.get(ref))
                except RayTaskError as e:
                    # The actor method itself raised (e.g. a schedule that does not parse): fail the batch.
                    for i in job.indices:
                        results[i] = _error_dict(schedules[i], f"evaluation task failed: {e.cause!r}")
                    idle.append(job.actor)
                    continue
                except RayError as e:
                    retries = self.settings.max_retries
                    give_up(job, f"worker lost or could not start after {retries} retries: {_short(e)}")
                    idle.append(job.actor)
                    continue
                self.stats.eval_seconds += float(doc["seconds"])
                self.stats.evaluations += len(job.indices)
                self.stats.recent_seconds.extend(float(r["seconds"]) for r in doc["results"])
                self.stats.pids.add(int(doc["pid"]))
                self.stats.trace.append(TaskTrace(job.actor, len(job.indices), job.submitted_at, float(doc["started"]),
                                                  float(doc["finished"]), received_at))
                for i, r in zip(job.indices, doc["results"]):
                    results[i] = r
                idle.append(job.actor)
            if timeout:
                now = time.monotonic()
                for ref, job in list(pending.items()):
                    if job.deadline > now:
                        continue
                    self.stats.timeouts += 1
                    job.kills += 1
                    if job.kills > self.settings.max_retries:
                        pending.pop(ref)
                        give_up(job, f"timed out ({timeout:g} s per candidate), {job.kills} attempt(s)")
                        idle.append(job.actor)
                    else:
                        # Killing with restart lets Ray re-run the batch on the restarted actor.
                        ray.kill(self._actors[job.actor], no_restart=False)
                        job.deadline = now + timeout * len(job.indices)
        self.stats.wall_seconds += time.perf_counter() - t_start
        out = []
        for s, r in zip(schedules, results):
            if r is None:
                raise RuntimeError(f"no result for schedule {s.canonical_hash()}: the dispatch loop lost it")
            out.append(EvalResult(schedule_hash=r["schedule_hash"], value=float(r["value"]), nfe=int(r["nfe"]),
                                  seconds=float(r["seconds"]), error=r["error"], extras=dict(r["extras"])))
        return out
