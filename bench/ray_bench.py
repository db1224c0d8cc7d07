"""Evaluations per minute on Ray with 1 and 2 workers, and Ray's overhead per evaluation.

    OMP_NUM_THREADS=1 python bench/ray_bench.py                       # toy evaluator, CPU-bound, ~0.5 s each
    OMP_NUM_THREADS=1 python bench/ray_bench.py --factory s3search.evaluation.local:LocalEvaluator \
        --model gmm-64d --metric fd --n-samples 1000                  # the real evaluation path

Overhead of one worker = (driver wall time - time inside the evaluator) / time inside the evaluator: everything
Ray adds (task submission, JSON transfer, scheduling, result fetch). With w workers the same sum is taken over
worker-time (w x wall), so it also counts idle workers at the end of a round. Batches are timed after a warm-up
round on other candidates, so actor start-up and the model load (paid once per worker) are reported separately
and no measured candidate is a memoised repeat.

The overhead is split with the per-task trace (s3search/distributed/trace.py) into: tail (a worker idle while
the other finishes), dispatch + fetch (Ray moving the task and its result) and driver (the dispatch loop).
Alongside, the CPU that Ray's daemons (GCS, raylet, log monitor, dashboard and agents) and the driver used
during the measured call, in % of one core.

"no Ray" rows: the same evaluator in w plain processes (multiprocessing pipes), fed by the same dispatch rule,
timed the same way, right after the Ray row of the same w in the same run. Their overhead is what the definition counts on this machine without Ray at all
(the tail, and process start-up excluded); the difference to the Ray row of the same w is Ray's own share.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import time
from typing import Any, Optional, Sequence

import ray
import torch

from s3search import processes
from s3search.distributed import RayEvaluator, RaySettings
from s3search.evaluation.base import EvalRequest
from s3search.distributed.ray_evaluator import load_factory
from s3search.distributed.trace import breakdown, next_batch_size
from s3search.schedule import SolverSchedule, StepSpec


def candidates(process: str, nfe: int, count: int, seed: int) -> list[SolverSchedule]:
    """Valid random schedules: warped log-sigma grids with random orders, for any registered process."""
    proc = processes.get(process)
    rng = random.Random(seed)
    sig_hi = min(proc.sigma_ve(proc.t_max * (1 - 1e-6)) if proc.t_max > 0 else 80.0, 80.0)
    sig_lo = max(proc.sigma_ve(proc.t_min) if proc.sigma(proc.t_min) > 0 else 0.002, 0.002)
    out = []
    for k in range(count):
        warp = rng.uniform(0.6, 1.6)
        sig = [math.exp(math.log(sig_hi) + (i / (nfe - 1)) ** warp * (math.log(sig_lo) - math.log(sig_hi)))
               for i in range(nfe)]
        ts = tuple(proc.t_of_sigma_ve(s) for s in sig)
        steps = tuple(StepSpec(order=rng.randint(1, min(3, i + 1)), eta=rng.choice([0.0, 0.0, 0.5]))
                      for i in range(nfe - 1))
        out.append(SolverSchedule(process=process, timesteps=ts, steps=steps, name=f"b{k}"))
    return out


def calibrate_toy(target_s: float) -> int:
    from s3search.distributed.toy import _burn

    _burn(50)
    t0 = time.perf_counter()
    _burn(200)
    per = (time.perf_counter() - t0) / 200
    return max(1, round(target_s / per))


# ----- CPU per process (Linux /proc), to see whether Ray's daemons or the driver take CPU from the workers ---

def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ray_processes() -> dict[int, str]:
    """This driver's descendants (Ray's daemons and workers), by pid, with the start of their command line."""
    parent: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, IndexError, ValueError):
            continue
    me, out = os.getpid(), {}
    for pid in parent:
        p, seen = pid, 0
        while p > 1 and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
            if p == me:
                out[pid] = names.get(pid, "")
                break
    return out


def cpu_snapshot() -> Optional[dict[str, float]]:
    """CPU seconds so far of the driver, of Ray's evaluation workers, and of the rest (the daemons)."""
    if not os.path.isdir("/proc"):
        return None
    snap = {"driver": _cpu_seconds(os.getpid()), "workers": 0.0, "daemons": 0.0}
    for pid, cmd in _ray_processes().items():
        try:
            key = "workers" if cmd.startswith("ray::") and "Agent" not in cmd else "daemons"
            snap[key] += _cpu_seconds(pid)
        except OSError:
            continue
    return snap


def _cpu_share(before: Optional[dict[str, float]], after: Optional[dict[str, float]], wall: float) -> dict:
    if before is None or after is None:
        return {}
    return {f"{k}_cpu_frac": (after[k] - before[k]) / wall for k in before}


# ----- the measured runs ------------------------------------------------------------------------------------

def _summary(workers: int, batch: int, n: int, wall: float, inside: float) -> dict[str, float]:
    return {"workers": workers, "batch": batch, "wall_s": wall, "evals_per_min": 60 * n / wall,
            "eval_s_mean": inside / n, "overhead_frac": (workers * wall - inside) / inside,
            "overhead_ms_per_eval": 1e3 * (workers * wall - inside) / n}


def run_ray(factory: str, kwargs: dict[str, Any], warm_cands: Sequence[SolverSchedule],
            cands: list[SolverSchedule], request: EvalRequest, workers: int, batch_size: int) -> dict[str, Any]:
    ev = RayEvaluator(RaySettings(max_in_flight=workers, batch_size=batch_size), factory=factory,
                      factory_kwargs=kwargs)
    t0 = time.perf_counter()
    ev.start()
    ray.get([a.ping.remote() for a in ev._actors])
    startup = time.perf_counter() - t0
    threads = ray.get([a.torch_threads.remote() for a in ev._actors])
    # Warm-up on other candidates: one per worker loads the model in each actor and times an evaluation.
    ev.evaluate(list(warm_cands[:workers]), request)
    warm = time.perf_counter() - t0 - startup
    ev.stats.wall_seconds = 0.0
    inside0 = ev.stats.eval_seconds
    batch = ev.batch_size_for(len(cands))
    cpu0, w0 = cpu_snapshot(), time.time()
    res = ev.evaluate(cands, request)
    w1, cpu1 = time.time(), cpu_snapshot()
    wall, inside = ev.stats.wall_seconds, ev.stats.eval_seconds - inside0
    parts = breakdown(ev.stats.trace, w0, w1, workers)
    sizes = [t.size for t in ev.stats.trace if t.submitted >= w0]
    ev.close()
    row = _summary(workers, batch, len(cands), wall, inside)
    row.update({"kind": "ray", "startup_s": startup, "warmup_s": warm, "failed": sum(not r.ok for r in res),
                "tasks": len(sizes), "torch_threads": max(threads),
                **{f"{k}_frac": getattr(parts, k) / inside for k in ("tail", "dispatch", "fetch", "driver")},
                **_cpu_share(cpu0, cpu1, w1 - w0)})
    return row


def _plain_worker(conn: Any, factory: str, kwargs: dict[str, Any], warm_json: str, request: EvalRequest) -> None:
    """A process like an actor, minus Ray: load, warm up on another candidate, then evaluate batches sent."""
    from s3search.distributed.ray_evaluator import schedule_from_json

    torch.set_num_threads(1)
    evaluator = load_factory(factory)(**kwargs)
    evaluator.evaluate([schedule_from_json(warm_json)], request)
    conn.send("ready")
    while (texts := conn.recv()) is not None:
        t0 = time.perf_counter()
        res = evaluator.evaluate([schedule_from_json(t) for t in texts], request)
        conn.send((time.perf_counter() - t0, sum(not r.ok for r in res)))


def run_plain(factory: str, kwargs: dict[str, Any], warm_cands: Sequence[SolverSchedule],
              cands: list[SolverSchedule], request: EvalRequest, workers: int, batch: int) -> dict[str, Any]:
    """The same candidates on `workers` plain processes with the same dispatch (an idle worker gets the next
    next_batch_size batch): what the overhead definition gives on this machine without Ray."""
    from multiprocessing.connection import wait

    texts = [c.to_json() for c in cands]
    ctx = multiprocessing.get_context("spawn")
    conns, procs = [], []
    for i in range(workers):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_plain_worker, args=(there, factory, kwargs, warm_cands[i].to_json(), request))
        proc.start()
        conns.append(here)
        procs.append(proc)
    for c in conns:            # all loaded and warm before the clock starts
        assert c.recv() == "ready"
    t0 = time.perf_counter()
    todo, idle, busy = list(range(len(texts))), list(conns), set()
    inside, failed, tasks = 0.0, 0, 0
    while todo or busy:
        while todo and idle:
            size = next_batch_size(len(todo), batch, workers)
            c = idle.pop()
            c.send([texts[i] for i in todo[:size]])
            del todo[:size]
            busy.add(c)
            tasks += 1
        for c in wait(list(busy)):
            seconds, bad = c.recv()
            inside, failed = inside + seconds, failed + bad
            busy.discard(c)
            idle.append(c)
    wall = time.perf_counter() - t0
    for c, proc in zip(conns, procs):
        c.send(None)
        proc.join(30)
    row = _summary(workers, batch, len(cands), wall, inside)
    row.update({"kind": "no Ray", "failed": failed, "tasks": tasks})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factory", default="s3search.distributed.toy:ToyEvaluator")
    p.add_argument("--kwargs", default="", help="JSON keyword arguments of the factory")
    p.add_argument("--eval-s", type=float, default=0.5, help="toy only: target seconds of CPU work per evaluation")
    p.add_argument("--model", default="toy")
    p.add_argument("--metric", default="toy")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--process", default="", help="process of the candidates (default: the model's, or edm)")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--candidates", type=int, default=24)
    p.add_argument("--configs", default="1:1,1:0,2:1,2:0",
                   help="workers:batch pairs to run on Ray (batch 0 = adaptive)")
    p.add_argument("--no-pool", action="store_true", help="skip the no-Ray process-pool rows")
    p.add_argument("--json", default="", help="also write the measurements here")
    args = p.parse_args()

    torch.set_num_threads(1)
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    toy = args.factory.endswith(":ToyEvaluator")
    if toy and "work" not in kwargs and "sleep_s" not in kwargs:
        kwargs["work"] = calibrate_toy(args.eval_s)
    process = args.process or ("edm" if toy else _model_process(args.model))
    cands = candidates(process, args.nfe, args.candidates, seed=1)
    warm_cands = candidates(process, args.nfe, 4, seed=2)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    request = EvalRequest(model=args.model, metric=args.metric, n_samples=args.n_samples, seed=0)

    # In-process baseline: the same evaluator, no Ray (after one warm-up evaluation).
    local = load_factory(args.factory)(**kwargs)
    local.evaluate(warm_cands[:1], request)
    t0 = time.perf_counter()
    local_res = local.evaluate(cands, request)
    local_wall = time.perf_counter() - t0

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    rows = []
    for w, b in configs:
        rows.append(run_ray(args.factory, kwargs, warm_cands, cands, request, w, b))
        if b == 0 and w > 1 and not args.no_pool:
            # Side by side with the Ray row just run: the same batches, no Ray.
            rows.append(run_plain(args.factory, kwargs, warm_cands, cands, request, w, rows[-1]["batch"]))
    ray.shutdown()

    print(f"# ray_bench: factory={args.factory} kwargs={json.dumps(kwargs)} model={args.model} "
          f"metric={args.metric} n_samples={args.n_samples} candidates={len(cands)} nfe={args.nfe}")
    print(f"# host: {os.cpu_count()} CPUs, load average at end {os.getloadavg()[0]:.2f}; ray {ray.__version__}")
    print(f"local (no Ray): {60 * len(cands) / local_wall:.1f} evals/min, {local_wall / len(cands):.3f} s/eval, "
          f"{sum(not r.ok for r in local_res)} failed")
    print("| run | workers | batch (tasks) | evals/min | s/eval inside | overhead | ms/eval | tail | "
          "dispatch+fetch | driver loop | daemons CPU | driver CPU | actor start s | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def pct(key: str) -> str:
            return f"{100 * r[key]:.1f}%" if key in r else "-"
        df = f"{100 * (r['dispatch_frac'] + r['fetch_frac']):.1f}%" if "dispatch_frac" in r else "-"
        start = f"{r['startup_s']:.2f} | {r['warmup_s']:.2f}" if "startup_s" in r else "- | -"
        print(f"| {r['kind']} | {r['workers']} | {r['batch']} ({r['tasks']}) | {r['evals_per_min']:.1f} | "
              f"{r['eval_s_mean']:.3f} | {100 * r['overhead_frac']:.1f}% | {r['overhead_ms_per_eval']:.1f} | "
              f"{pct('tail_frac')} | {df} | {pct('driver_frac')} | {pct('daemons_cpu_frac')} | "
              f"{pct('driver_cpu_frac')} | {start} |")
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    print(f"# torch intra-op threads per actor: {threads}; failed evaluations: {sum(r['failed'] for r in rows)}")
    print("# tail, dispatch+fetch and driver loop are % of the time inside the evaluators, like the overhead; "
          "daemons and driver CPU are % of one core during the measured call")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"local_wall_s": local_wall, "rows": rows, "kwargs": kwargs,
                       "loadavg_end": os.getloadavg()}, f, indent=1)


def _model_process(model: str) -> str:
    from s3search.models import registry

    return registry.get(model).process.name


if __name__ == "__main__":
    main()
