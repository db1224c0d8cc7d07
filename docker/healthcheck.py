"""Container health checks, one per role of the s3search image (compose.yaml names one per service).

    python healthcheck.py api         GET /healthz on the API port answers 200
    python healthcheck.py dashboard   the dashboard answers its own basic-auth user (S3S_DASHBOARD_*) below 400
    python healthcheck.py runner      an `s3search runner` process is alive in this container
    python healthcheck.py ray ADDR    this node's raylet is alive and `ray status --address ADDR` reaches the
                                      cluster (ADDR: the head's HOST:PORT)

Exit status 0 is healthy, 1 unhealthy (with one line on stderr saying why). Only the standard library is used
for the HTTP and process checks, so a check costs milliseconds, not a torch import.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

__all__ = ["check_http", "check_process", "check_ray", "CHECKS", "main"]


def check_http(port: int, path: str, *, auth: Optional[tuple[str, str]] = None, host: str = "127.0.0.1",
               timeout: float = 5.0) -> Optional[str]:
    """None when GET path answers below 400 (a redirect counts: the server is up), else the reason."""
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        status = conn.getresponse().status
    except OSError as e:
        return f"GET http://{host}:{port}{path}: {type(e).__name__}: {e}"
    finally:
        conn.close()
    return None if status < 400 else f"GET http://{host}:{port}{path} answered {status}"


def check_process(words: tuple[str, ...], proc: Path = Path("/proc")) -> Optional[str]:
    """None when a process whose command line holds all of `words` (in order) is alive, else the reason."""
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue                          # the process ended while we looked
        args = [a.decode(errors="replace") for a in argv if a]
        it = iter(args)
        if args and all(any(w == a or a.endswith("/" + w) for a in it) for w in words):
            return None
    return f"no process running {' '.join(words)}"


def check_ray(address: str, timeout: float = 60.0, proc: Path = Path("/proc")) -> Optional[str]:
    """None when this node's raylet runs and `ray status --address address` succeeds, else the reason."""
    problem = check_process(("raylet",), proc)
    if problem is not None:
        return problem
    ray = shutil.which("ray")
    if ray is None:
        return "the ray command is not installed"
    try:
        done = subprocess.run([ray, "status", f"--address={address}"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"ray status took over {timeout:.0f} s"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return f"ray status failed: {last[0]}"
    return None


def _dashboard() -> Optional[str]:
    password = os.environ.get("S3S_DASHBOARD_PASSWORD")
    auth = (os.environ.get("S3S_DASHBOARD_USER", "s3search"), password) if password else None
    return check_http(int(os.environ.get("S3S_HEALTH_PORT", "8080")), "/", auth=auth)


# Each check and how many arguments it takes.
CHECKS: dict[str, tuple[Callable[..., Optional[str]], int]] = {
    "api": (lambda: check_http(int(os.environ.get("S3S_HEALTH_PORT", "8000")), "/healthz"), 0),
    "dashboard": (_dashboard, 0),
    "runner": (lambda: check_process(("s3search", "runner")), 0),
    "ray": (check_ray, 1),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CHECKS or len(argv) - 1 != CHECKS[argv[0]][1]:
        print("usage: healthcheck.py api | dashboard | runner | ray HEAD_HOST:PORT", file=sys.stderr)
        return 2
    check, _ = CHECKS[argv[0]]
    problem = check(*argv[1:])
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
