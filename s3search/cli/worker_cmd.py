"""`s3search worker`: add this machine to a Ray cluster (or start the head) with the resources evaluations use.

It wraps `ray start`, so the docker images and a hand-run machine use the same command:

    head:    s3search worker --head --port 6379            # then: export RAY_ADDRESS=HEAD_IP:6379 for the runner
    worker:  s3search worker --address HEAD_IP:6379 --num-gpus 1
    check:   s3search worker --address HEAD_IP:6379 --dry-run   # print the `ray start` line only

Ray's token authentication is on when the head was started with a token (RAY_AUTH_MODE=token, or a token file):
then copy the head's token (`ray get-auth-token` on the head) into the worker's environment as RAY_AUTH_TOKEN (or
~/.ray/auth_token) before starting it; see docs/ray.md.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import Optional

import typer

__all__ = ["ray_start_argv", "register"]


def _ray_executable() -> list[str]:
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def ray_start_argv(*, address: Optional[str], head: bool, port: int = 6379, num_cpus: Optional[int] = None,
                   num_gpus: Optional[int] = None, block: bool = True,
                   dashboard_host: str = "127.0.0.1") -> list[str]:
    """The `ray start` arguments for a head or a worker node; raises ValueError for contradictory options."""
    if head == bool(address):
        raise ValueError("address: give --address HOST:PORT to join a cluster, or --head to start one (not both)")
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"address={address!r} must look like HOST:PORT")
    if not 1 <= port <= 65535:
        raise ValueError(f"port={port!r} must be from 1 to 65535")
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None and value < 0:
            raise ValueError(f"{name}={value!r} must be >= 0")
    argv = ["start", "--disable-usage-stats"]
    if head:
        # The dashboard has no authentication of its own: keep it on localhost unless told otherwise.
        argv += ["--head", f"--port={port}", f"--dashboard-host={dashboard_host}"]
    else:
        argv += [f"--address={address}"]
    if num_cpus is not None:
        argv += [f"--num-cpus={num_cpus}"]
    if num_gpus is not None:
        argv += [f"--num-gpus={num_gpus}"]
    if block:
        argv += ["--block"]
    return argv


def worker(
    address: Optional[str] = typer.Option(None, help="HOST:PORT of the Ray head to join."),
    head: bool = typer.Option(False, "--head", help="Start the head node of a new cluster instead."),
    port: int = typer.Option(6379, help="Port of the head (with --head)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs this node offers (default: all)."),
    num_gpus: Optional[int] = typer.Option(None, help="GPUs this node offers (default: all visible)."),
    block: bool = typer.Option(True, "--block/--no-block", help="Stay in the foreground (containers want this)."),
    dashboard_host: str = typer.Option("127.0.0.1", help="Where the head binds Ray's dashboard."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the `ray start` command and exit."),
) -> None:
    """Add this machine to the Ray cluster that runs evaluations (wraps `ray start`)."""
    try:
        argv = _ray_executable() + ray_start_argv(address=address, head=head, port=port, num_cpus=num_cpus,
                                                  num_gpus=num_gpus, block=block, dashboard_host=dashboard_host)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(shlex.join(argv))
    if dry_run:
        return
    if not head and not (os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
        typer.echo("note: no RAY_AUTH_TOKEN or ~/.ray/auth_token here; a head started with token auth will refuse "
                   "this node "
                   "(run `ray get-auth-token` on the head).", err=True)
    raise typer.Exit(subprocess.call(argv))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
