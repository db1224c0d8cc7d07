"""Real processes for the end-to-end and fault tests: `s3search serve / runner / dashboard` as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import contextlib
from collections.abc import Iterator

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(db_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The new top-level packages (api, studies, predictors) may not be in the editable install's map yet.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DATABASE_URL"] = db_url
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def cli(args: list[str], env: dict[str, str], log: Optional[Path] = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from s3search.cli import main; main()", *args]
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def cli_run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from s3search.cli import main; main()", *args]
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def wait_http(url: str, timeout: float = 120, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def poll_job(client: httpx.Client, job_id: str, until: tuple[str, ...], timeout: float = 240,
             min_evaluations: int = 0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until and job["progress"]["evaluations"] >= min_evaluations:
            return job
        if job["status"] in ("failed",) and "failed" not in until:
            raise AssertionError(f"job failed: {job['error']}")
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} not {until} after {timeout} s: {job}")


@contextlib.contextmanager
def serving(db_url: str, folder: Path, owner: str = "alice", **settings: str) -> Iterator[tuple[str, str]]:
    """`s3search serve` on `db_url` with these S3S_* settings and a fresh key of `owner`: (base url, key). The
    server's log is printed when it stops."""
    env = cli_env(db_url, **settings)
    made = cli_run(["keys", "create", owner], env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = cli(["serve", "--port", str(port), "--log-level", "warning"], env, folder / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc)
        yield f"http://127.0.0.1:{port}", key
    finally:
        stop(proc)
        print("--- api log ---\n" + (folder / "api.log").read_text()[-3000:])


def report_best(db_url: str, job_id: str, best: dict) -> None:
    """Claim the queued job `job_id` as a runner would and report `best` as its best schedule so far."""
    from studies import jobs as repo
    from studies.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            job = repo.claim_next(s, "test-runner")
            assert job is not None and job.id == job_id
            assert repo.record_progress(s, job_id, job.claim_token, evaluations=1, best_value=0.5,
                                        best_schedule=best, message="running")
    finally:
        engine.dispose()
