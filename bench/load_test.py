"""Bounded load test of the REST API on loopback: p50 / p99 latency of job reads and submissions.

    python bench/load_test.py                          # a fresh SQLite file, server started here
    python bench/load_test.py --database-url postgresql://postgres@127.0.0.1:5432/test
    python bench/load_test.py --server http://127.0.0.1:8000 --key s3s_...   # an already running server

It starts `s3search serve` (one uvicorn worker) unless --server is given, creates an API key, then runs
`--clients` concurrent clients, each making `--requests` calls, first of GET /v1/jobs/{id}, then of POST
/v1/jobs. Latencies are measured on the client, per request, and printed as a Markdown table with the
server's CPU time per request (server process and its worker processes, from /proc), which says what one core
can serve when the client does not compete with the server for the same cores.
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


class RawClient:
    """A keep-alive HTTP/1.1 client on asyncio streams, one connection per simulated client.

    httpx costs a few ms of CPU per request, more than the server's own work; on a small machine the client then
    takes the cores the server needs. This one does little more than write the request and read Content-Length
    bytes, so the figures describe the server."""

    def __init__(self, base: str, key: str):
        u = httpx.URL(base)
        self.host, self.port, self.key = u.host, u.port or 80, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nX-API-Key: {self.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        assert self.reader is not None
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def raw_phase(base: str, key: str, clients: int, requests: int, make) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one_client(i: int) -> None:
        c = RawClient(base, key)
        try:
            for j in range(requests):
                method, path, body = make(i, j)
                t0 = time.perf_counter()
                status = await c.request(method, path, body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            await c.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies, statuses


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


def row(name: str, lat: list[float], statuses: dict[int, int], wall: float, cpu_s: float | None) -> str:
    ms = [x * 1000 for x in lat]
    cpu = f"{cpu_s * 1000 / len(ms):.2f}" if cpu_s is not None else "n/a"
    return (f"| {name} | {len(ms)} | {percentile(ms, 0.5):.1f} | {percentile(ms, 0.99):.1f} | {max(ms):.1f} | "
            f"{statistics.fmean(ms):.1f} | {len(ms) / wall:.0f} | {cpu} | {json.dumps(statuses)} |")


def _proc_stat(pid: int) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int | None) -> float | None:
    """CPU seconds used so far by the server process and its children (uvicorn workers); Linux only."""
    if pid is None or not Path("/proc").is_dir():
        return None
    total, parents = 0.0, {pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, cpu = _proc_stat(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
        if int(entry.name) == pid or ppid in parents:
            total += cpu
    return total


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
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="raw: a minimal keep-alive client (little CPU); httpx: httpx.AsyncClient")
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

        def read_req(i: int, j: int) -> tuple[str, str, bytes]:
            return "GET", f"/v1/jobs/{job_id}", b""

        def submit_req(i: int, j: int) -> tuple[str, str, bytes]:
            return "POST", "/v1/jobs", json.dumps({**JOB, "seed": 1 + i * args.requests + j}).encode()

        def via_httpx(req):
            async def call(c: httpx.AsyncClient, i: int, j: int) -> httpx.Response:
                method, path, body = req(i, j)
                return await c.request(method, path, content=body, headers={"Content-Type": "application/json"})
            return call

        run_phase = raw_phase if args.client == "raw" else phase
        wrap = (lambda r: r) if args.client == "raw" else via_httpx
        read, submit = wrap(read_req), wrap(submit_req)
        asyncio.run(run_phase(base, key, args.clients, 5, read))     # warm-up, not counted
        print(f"backend: {backend}; {args.clients} concurrent clients x {args.requests} requests; "
              f"uvicorn workers: {args.workers}; client: {args.client}; loopback\n")
        print("| request | n | p50 ms | p99 ms | max ms | mean ms | req/s | server CPU ms/req | statuses |")
        print("|---|---|---|---|---|---|---|---|---|")
        pid = proc.pid if proc is not None else None
        for name, make in (("GET /v1/jobs/{id}", read), ("POST /v1/jobs", submit)):
            t0, c0 = time.perf_counter(), server_cpu_s(pid)
            lat, statuses = asyncio.run(run_phase(base, key, args.clients, args.requests, make))
            c1 = server_cpu_s(pid)
            print(row(name, lat, statuses, time.perf_counter() - t0, None if c0 is None else c1 - c0))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
