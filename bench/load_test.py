"""Bounded load test of the REST API on loopback: p50 / p99 latency of job reads and submissions.

    python bench/load_test.py                          # a fresh SQLite file, server started here
    python bench/load_test.py --database-url postgresql://postgres@127.0.0.1:5432/test
    python bench/load_test.py --server http://127.0.0.1:8000 --key s3s_...   # an already running server

It starts `s3search serve` (one uvicorn worker) unless --server is given, creates an API key, then runs
`--clients` concurrent clients, each making `--requests` calls, first of GET /v1/jobs/{id}, then of POST
/v1/jobs. Latencies are measured on the client, per request, and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JOB = {"model": "gmm-64d", "nfe": 5, "budget": 10, "n_samples": 64, "n_test_samples": 64, "predictor": "ridge"}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def phase(base: str, key: str, clients: int, requests: int, make) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, limits=limits, timeout=60) as c:
        async def one_client(i: int) -> None:
            for j in range(requests):
                t0 = time.perf_counter()
                r = await make(c, i, j)
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies, statuses


def row(name: str, lat: list[float], statuses: dict[int, int], wall: float) -> str:
    ms = [x * 1000 for x in lat]
    return (f"| {name} | {len(ms)} | {percentile(ms, 0.5):.1f} | {percentile(ms, 0.99):.1f} | {max(ms):.1f} | "
            f"{statistics.fmean(ms):.1f} | {len(ms) / wall:.0f} | {json.dumps(statuses)} |")


def start_server(db_url: str, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "S3S_MAX_ACTIVE_JOBS_PER_OWNER": "1000000"}
    cmd = [sys.executable, "-c", "from s3search.cli import main; main()", "serve", "--port", str(port),
           "--log-level", "warning", "--workers", str(workers)]
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=None, help="default: a fresh SQLite file in a temp folder")
    ap.add_argument("--server", default=None, help="use a running server instead of starting one")
    ap.add_argument("--key", default=None, help="API key for --server")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=50, help="requests per client per phase")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers of the started server")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    proc = None
    if args.server is None:
        db_url = args.database_url or f"sqlite:///{tempfile.mkdtemp(prefix='s3s-load-')}/load.db"
        from studies.db import make_engine, make_session_factory
        from studies.keys import create_key
        from studies.migrate import upgrade

        engine = make_engine(db_url)
        upgrade(engine)
        with make_session_factory(engine)() as s:
            key = create_key(s, f"load-{int(time.time())}")[1]
        engine.dispose()
        proc = start_server(db_url, args.port, args.workers)
        base = f"http://127.0.0.1:{args.port}"
        backend = db_url.split(":", 1)[0]
    else:
        base, key, backend = args.server.rstrip("/"), args.key, "existing server"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.3)
        first = httpx.post(f"{base}/v1/jobs", json=JOB, headers={"X-API-Key": key}, timeout=30)
        first.raise_for_status()
        job_id = first.json()["id"]

        async def read(c: httpx.AsyncClient, i: int, j: int) -> httpx.Response:
            return await c.get(f"/v1/jobs/{job_id}")

        async def submit(c: httpx.AsyncClient, i: int, j: int) -> httpx.Response:
            return await c.post("/v1/jobs", json={**JOB, "seed": 1 + i * args.requests + j})

        asyncio.run(phase(base, key, args.clients, 5, read))     # warm-up, not counted
        print(f"backend: {backend}; {args.clients} concurrent clients x {args.requests} requests; "
              f"uvicorn workers: {args.workers}; loopback\n")
        print("| request | n | p50 ms | p99 ms | max ms | mean ms | req/s | statuses |")
        print("|---|---|---|---|---|---|---|---|")
        for name, make in (("GET /v1/jobs/{id}", read), ("POST /v1/jobs", submit)):
            t0 = time.perf_counter()
            lat, statuses = asyncio.run(phase(base, key, args.clients, args.requests, make))
            print(row(name, lat, statuses, time.perf_counter() - t0))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
