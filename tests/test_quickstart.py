"""The quick starts run as written: the README's and the service's (docs/service.md), command by command.

Each fenced shell command runs in a fresh folder. Two kinds are not run here, and are checked instead:
`make install` and `make test` would rebuild the environment and rerun this suite from inside it, so their
recipes are dry-run (`make -n`) and `make test` must be the command CI runs. A line ending in `&` starts a
server; the harness waits for its port before the next line, as a person typing would. The placeholders a
reader fills in (`s3s_...`, `<job-id>`) take the values the earlier commands printed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def fenced_commands(text: str, heading: str) -> list[str]:
    """The shell commands of the first fenced block after `heading`, comments and blank lines removed."""
    start = re.search(rf"^#+ {re.escape(heading)}.*$", text, flags=re.M)
    assert start, f"no heading {heading!r}"
    block = re.search(r"^```(?:bash|sh|shell)\n(.*?)^```", text[start.end():], flags=re.M | re.S)
    assert block, f"no fenced shell block under {heading!r}"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _free(port):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before listening on {port}")
        time.sleep(0.3)
    raise AssertionError(f"nothing listened on port {port} within {timeout:g} s")


def _env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3S_", "S3SEARCH_", "DATABASE_URL", "RAY_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"   # as with the venv activated
    env["S3SEARCH_CACHE_DIR"] = str(folder / "cache")
    env["HOME"] = str(folder)
    return env


def _run(line: str, folder: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"`{line}` exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _check_make(line: str) -> None:
    target = line.split()[1]
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), target], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    if target == "test":
        assert dry.stdout.strip() == ".venv/bin/python -m pytest -q", dry.stdout
        assert "\nmake test" in (ROOT / ".ci" / "run").read_text()     # the README's test command is CI's


def test_readme_quick_start_runs_as_written(tmp_path):
    commands = fenced_commands((ROOT / "README.md").read_text(), "Quick start")
    assert any(c.startswith("make install") for c in commands) and any("s3search search" in c for c in commands)
    (tmp_path / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    env = _env(tmp_path)
    outputs = {}
    for line in commands:
        if line.startswith("make "):
            _check_make(line)
            continue
        outputs[line] = _run(line, tmp_path, env)
    search = next(out for line, out in outputs.items() if "s3search search" in line)
    assert "NFE 5 - test split" in search.stdout
    assert (tmp_path / "s3search.db").is_file() and list((tmp_path / "results").glob("*.json"))
    assert (tmp_path / "plots" / "metric_vs_nfe.png").is_file() and (tmp_path / "plots" / "best_so_far.png").is_file()


SERVICE_PORTS = {"serve": 8000, "dashboard": 8080}


def test_service_quick_start_runs_as_written(tmp_path):
    commands = fenced_commands((ROOT / "docs" / "service.md").read_text(), "Quick start")
    busy = [p for p in SERVICE_PORTS.values() if not _free(p)]
    if busy:
        pytest.skip(f"ports {busy} are in use on this machine; the quick start serves on them")
    env = _env(tmp_path)
    servers: list[subprocess.Popen] = []
    key = job = None
    try:
        for line in commands:
            if line.endswith("&"):
                cmd = line[:-1].strip()
                log = (tmp_path / f"{cmd.split()[1]}.log").open("w")
                servers.append(subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=tmp_path, env=env, stdout=log,
                                                stderr=subprocess.STDOUT))
                port = SERVICE_PORTS.get(cmd.split()[1])
                if port is not None:
                    _wait_for_port(port, servers[-1])
                continue
            if line.startswith("export S3S_API_KEY="):
                assert key, "the quick start sets the key before creating one"
                env["S3S_API_KEY"] = key
                continue
            if "<job-id>" in line:
                assert job, "the quick start uses a job id before submitting one"
                line = line.replace("<job-id>", job)
            out = _run(line, tmp_path, env, timeout=900)
            if " keys create " in f" {line} ":
                key = re.search(r"s3s_\S+", out.stdout).group(0)
            if "s3search submit" in line:
                job = out.stdout.split()[0]
                assert '"status": "succeeded"' in out.stdout, out.stdout[-2000:]
            if "s3search export" in line:
                assert "timesteps" in out.stdout or "sigmas" in out.stdout, out.stdout
            if "s3search status" in line:
                assert job in out.stdout
        assert key and job
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
