"""The compose file and Dockerfile agree with the CLI and the settings: every command, option and variable."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml

from api.settings import Settings
from s3search.cli import app as cli_app
from studies.db import normalize_url

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
APP_SERVICES = {name: svc for name, svc in COMPOSE["services"].items() if str(svc.get("image", "")).startswith(
    "s3search")}


def settings_env_names() -> set[str]:
    names = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is not None and hasattr(alias, "choices"):
            names.update(str(c) for c in alias.choices)
        else:
            names.add((prefix + name).upper())
    return names


def other_env_names() -> set[str]:
    from s3search.distributed.settings import ENV_PREFIX, RaySettings
    from s3search.evaluation.reference import ENV_CACHE_DIR
    from s3search.metrics.fid import ENV_WEIGHTS
    from s3search.models.registry import ENV_REGISTRY

    ray = {ENV_PREFIX + f.upper() for f in RaySettings.__dataclass_fields__ if f != "address"} | {"RAY_ADDRESS"}
    return ray | {ENV_CACHE_DIR, ENV_WEIGHTS, ENV_REGISTRY}


def command_of(argv: list[str]) -> tuple[click.Command, list[str]]:
    group = typer.main.get_command(cli_app)
    cmd, rest = group, list(argv)
    while isinstance(cmd, click.Group):
        assert rest and rest[0] in cmd.commands, f"{rest[:1]} is not an s3search command"
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    return cmd, rest


def check_argv(argv: list[str]) -> None:
    cmd, rest = command_of(argv)
    ctx = click.Context(cmd)
    # click parses exactly as the real command line would: unknown options and missing values raise.
    cmd.parse_args(ctx, list(rest))


def test_there_are_app_services():
    assert {"api", "runner", "dashboard", "ray-head", "ray-gpu-worker"} <= set(APP_SERVICES)
    assert {"postgres", "proxy"} <= set(COMPOSE["services"])


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_service_commands_parse(name):
    check_argv([str(a) for a in APP_SERVICES[name]["command"]])


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_service_variables_are_known_and_valid(name, monkeypatch):
    env: dict[str, Any] = APP_SERVICES[name].get("environment") or {}
    known = settings_env_names() | other_env_names()
    unknown = sorted(set(env) - known)
    assert not unknown, f"{name}: variables no part of s3search reads: {unknown}"
    for k in list(os.environ):
        if k.startswith(("S3S_", "S3SEARCH_")) or k == "DATABASE_URL":
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, re.sub(r"\$\{[^}]*\}", "secret", str(v)))
    s = Settings()                       # raises on a value the settings refuse
    assert normalize_url(s.database_url).startswith("postgresql+psycopg://")
    from s3search.distributed.settings import RaySettings
    RaySettings.from_env()


def test_ports_and_proxy_agree_with_commands():
    api_cmd = [str(a) for a in APP_SERVICES["api"]["command"]]
    api_port = api_cmd[api_cmd.index("--port") + 1]
    assert any(str(p).endswith(f":{api_port}") for p in APP_SERVICES["api"]["ports"])
    dash_cmd = [str(a) for a in APP_SERVICES["dashboard"]["command"]]
    dash_port = dash_cmd[dash_cmd.index("--port") + 1]
    assert "ports" not in APP_SERVICES["dashboard"], "only the proxy may publish the dashboard"
    # Bound to 0.0.0.0 the dashboard refuses to start without a password (studies.dashboard), so compose must
    # require one; it then checks the credentials itself and the proxy only forwards them.
    assert "S3S_DASHBOARD_PASSWORD" in APP_SERVICES["dashboard"]["environment"]
    assert "--allow-writes" not in dash_cmd
    nginx = (DOCKER / "proxy" / "nginx.conf").read_text()
    assert f"proxy_pass           http://dashboard:{dash_port};" in nginx and "auth_basic " not in nginx
    head = [str(a) for a in APP_SERVICES["ray-head"]["command"]]
    worker = [str(a) for a in APP_SERVICES["ray-gpu-worker"]["command"]]
    assert worker[worker.index("--address") + 1] == f"ray-head:{head[head.index('--port') + 1]}"
    assert APP_SERVICES["runner"]["environment"]["RAY_ADDRESS"] == f"ray-head:{head[head.index('--port') + 1]}"


def test_mounts_are_read_only():
    for name, svc in APP_SERVICES.items():
        for v in svc.get("volumes", []):
            if v.split(":")[1] in ("/models", "/weights"):
                assert v.endswith(":ro"), f"{name}: {v} must be read-only"


def test_dockerfile_matches_the_repository_and_cli():
    text = (DOCKER / "Dockerfile").read_text()
    repo = DOCKER.parent
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.M):
        for path in src.split():
            assert (repo / path).exists(), f"COPY {path}: no such path in the repository"
    assert 'ENTRYPOINT ["s3search"]' in text
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    check_argv(yaml.safe_load(cmd.group(1)))
    assert "ARG BASE_IMAGE" in text and "ARG TORCH_INDEX" in text
