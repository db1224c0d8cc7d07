"""The compose file and Dockerfile agree with the code: every command, option, variable, mount, health check,
file name and build argument. No Docker daemon is needed (there is none here, and Debian ships no compose v2
plugin to run `docker compose config` with), so the files are parsed and checked against the real CLI parser,
the settings classes and the constants the code reads."""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shlex
import threading
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import typer.main
import yaml

from api.settings import Settings
from s3search.cli import app as cli_app
from studies.db import normalize_url

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
APP_SERVICES = {name: svc for name, svc in COMPOSE["services"].items() if str(svc.get("image", "")).startswith(
    "s3search")}
HEALTHCHECK_IN_IMAGE = "/app/docker/healthcheck.py"

# CUDA variants of the PyTorch wheel index per torch minor version. torch 2.13.0: cpu, cu126, cu129, cu130, cu132
# (cu126 and cu130 are also in 2.12's matrix). Bumping torch in .ci/constraints.txt without checking which
# variants exist fails here.
TORCH_INDEX_VARIANTS = {"2.13": {"cpu", "cu126", "cu129", "cu130", "cu132"}}


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("s3s_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEALTH = load_healthcheck()


# ----- helpers ------------------------------------------------------------------------------------------------
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
    from s3search.distributed.settings import env_names
    from s3search.evaluation.reference import ENV_CACHE_DIR
    from s3search.metrics.fid import ENV_WEIGHTS
    from s3search.models.registry import ENV_REGISTRY

    # Ray reads these itself: docs/service.md says how to turn its token authentication on in compose.
    ray_own = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    return set(env_names().values()) | ray_own | {ENV_CACHE_DIR, ENV_WEIGHTS, ENV_REGISTRY}


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


def commands(svc: dict[str, Any]) -> list[list[str]]:
    """The s3search argument lists a service runs, in order (the image's entrypoint is `s3search`)."""
    command = [str(a) for a in svc["command"]]
    entry = svc.get("entrypoint")
    if entry is None:
        return [command]
    # Only a shell running `s3search ...` commands joined by && is allowed in place of the entrypoint.
    assert [str(a) for a in entry] == ["/bin/sh", "-c"] and len(command) == 1, entry
    out = []
    for part in command[0].split("&&"):
        argv = shlex.split(part)
        if argv[:1] == ["exec"]:
            argv = argv[1:]
        assert argv[:1] == ["s3search"], f"{part!r}: only s3search commands may run"
        out.append(argv[1:])
    assert command[0].split("&&")[-1].split()[0] == "exec", "the last command must replace the shell (signals)"
    return out


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def head_port() -> str:
    return option([str(a) for a in APP_SERVICES["ray-head"]["command"]], "--port")


def role_of(svc: dict[str, Any]) -> str:
    main = commands(svc)[-1][0]
    return {"serve": "api", "dashboard": "dashboard", "runner": "runner", "worker": "ray"}[main]


def mounts(svc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in svc.get("volumes", []):
        assert isinstance(v, dict), f"{v!r}: write mounts in the long form (a missing source must not be created)"
        out.append(v)
    return out


# ----- the compose file as Docker reads it ------------------------------------------------------------------------
def interpolated(text: str) -> str:
    """compose.yaml with every ${VAR...} replaced, as `docker compose` would with the variables set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[?-][^}]*)?\}", "secret", text)


def test_compose_file_follows_the_compose_specification():
    """The Compose Specification's own JSON Schema (tests/service/data/compose-spec.json, from the
    compose-spec/compose-spec repository, Apache-2.0, licence beside it) accepts the file: every key is one
    Docker knows, every value has its type. This is the check `docker compose config` makes first."""
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
    doc = yaml.safe_load(interpolated((DOCKER / "compose.yaml").read_text()))
    errors = [f"{e.json_path}: {e.message[:200]}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, errors
    # The schema refuses what the file must not have: a misspelt key fails.
    doc["services"]["api"]["healthchek"] = doc["services"]["api"].pop("healthcheck")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc))


def test_required_variables_are_named_in_the_header():
    text = (DOCKER / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", text))
    assert required == {"POSTGRES_PASSWORD", "S3S_DASHBOARD_PASSWORD"}
    header = text.split("\nname:")[0]
    assert all(f"{name}=" in header for name in required), "say in the header what must be exported"


# ----- commands and variables ---------------------------------------------------------------------------------
def test_there_are_app_services():
    assert {"api", "runner", "dashboard", "ray-head", "ray-gpu-worker"} <= set(APP_SERVICES)
    assert {"postgres", "proxy"} <= set(COMPOSE["services"])


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_service_commands_parse(name):
    for argv in commands(APP_SERVICES[name]):
        check_argv(argv)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_service_variables_are_known_and_valid(name, monkeypatch):
    env: dict[str, Any] = APP_SERVICES[name].get("environment") or {}
    known = settings_env_names() | other_env_names()
    unknown = sorted(set(env) - known)
    assert not unknown, f"{name}: variables no part of s3search reads: {unknown}"
    for k in list(os.environ):
        if k.startswith(("S3S_", "S3SEARCH_")) or k in ("DATABASE_URL", "RAY_ADDRESS"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, re.sub(r"\$\{[^}]*\}", "secret", str(v)))
    s = Settings()                       # raises on a value the settings refuse
    assert normalize_url(s.database_url).startswith("postgresql+psycopg://")
    from s3search.distributed.settings import RaySettings
    RaySettings.from_env()


def test_dockerfile_matches_the_repository_and_cli():
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", DOCKERFILE, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: no such path in the repository"
    assert 'ENTRYPOINT ["s3search"]' in DOCKERFILE
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, flags=re.M)
    check_argv(yaml.safe_load(cmd.group(1)))
    assert "ARG BASE_IMAGE" in DOCKERFILE and "ARG TORCH_INDEX" in DOCKERFILE


# ----- Ray ------------------------------------------------------------------------------------------------------
def test_nodes_join_the_head():
    worker = commands(APP_SERVICES["ray-gpu-worker"])[0]
    assert worker[0] == "worker" and option(worker, "--address") == f"ray-head:{head_port()}"


def test_runner_is_a_driver_on_a_ray_node_of_its_own():
    """A driver given HOST:PORT needs a raylet on its own machine; without one Ray waits for it and times out.
    The runner must either use Ray Client (ray://, with the head's client server) or start a local node first."""
    runner = APP_SERVICES["runner"]
    steps = commands(runner)
    assert steps[-1][0] == "runner" and option(steps[-1], "--evaluator") == "ray"
    address = runner["environment"]["RAY_ADDRESS"]
    if address.startswith("ray://"):
        return
    join = steps[0]
    assert len(steps) == 2 and join[0] == "worker", "start this container's Ray node before the runner"
    assert option(join, "--address") == f"ray-head:{head_port()}" == address
    assert "--no-block" in join, "the node must start in the background, then the runner runs"
    # The runner's node takes no evaluations: they go where the GPUs are.
    assert option(join, "--num-cpus") == "0" and option(join, "--num-gpus") == "0"
    assert APP_SERVICES["runner"]["environment"]["S3SEARCH_RAY_GPUS_PER_EVAL"] == "1"
    assert runner.get("init") is True or COMPOSE["x-app"].get("init") is True, \
        "an init process must reap the node's daemons and pass SIGTERM on"


# ----- files the code reads -----------------------------------------------------------------------------------
def test_inception_weights_file_is_the_one_fid_reads():
    from s3search.metrics.fid import ENV_WEIGHTS, WEIGHTS_FILENAME

    for name, svc in APP_SERVICES.items():
        path = PurePosixPath(svc["environment"][ENV_WEIGHTS])
        assert path.name == WEIGHTS_FILENAME, f"{name}: fid reads {WEIGHTS_FILENAME}, not {path.name}"
        targets = {m["target"] for m in mounts(svc)}
        assert str(path.parent) in targets, f"{name}: {path.parent} is not mounted"


def test_bind_mounts_are_read_only_and_never_created():
    for name, svc in COMPOSE["services"].items():
        for m in svc.get("volumes", []):
            if isinstance(m, str) and m.split(":")[0].startswith((".", "/")):
                pytest.fail(f"{name}: {m!r} would make Docker create a missing source as a directory")
    for name, svc in list(APP_SERVICES.items()) + [("proxy", COMPOSE["services"]["proxy"])]:
        for m in mounts(svc):
            if m["type"] != "bind":
                continue
            assert m.get("read_only") is True, f"{name}: {m['target']} must be read-only"
            assert m.get("bind", {}).get("create_host_path") is False, f"{name}: {m['source']} must exist"
            assert (DOCKER / m["source"]).exists() or m["source"] in ("./models", "./weights"), m["source"]


def test_cache_volume_is_writable_by_the_image_user():
    from s3search.evaluation.reference import ENV_CACHE_DIR

    uid = re.search(r"useradd [^\n]*--uid (\d+) (\S+)", DOCKERFILE)
    assert uid and re.search(rf"^USER {uid.group(2)}$", DOCKERFILE, flags=re.M)
    for name, svc in APP_SERVICES.items():
        cache = svc["environment"][ENV_CACHE_DIR]
        volume = [m for m in mounts(svc) if m["target"] == cache]
        assert volume and volume[0]["type"] == "volume" and volume[0]["source"] in COMPOSE["volumes"], name
        # A new named volume starts as a copy of the image's directory, owner included: the image must make
        # that directory and give it to the user the processes run as.
        assert re.search(rf"mkdir -p [^\n]*{re.escape(cache)}\b", DOCKERFILE), f"the image must create {cache}"
        assert re.search(rf"chown {uid.group(1)}(:\d+)? {re.escape(cache)}\b", DOCKERFILE), \
            f"{cache} must belong to uid {uid.group(1)}"
        assert re.search(r"S3SEARCH_CACHE_DIR=(\S+)", DOCKERFILE).group(1) == cache


# ----- health checks ------------------------------------------------------------------------------------------
def test_each_role_has_its_own_health_check():
    assert f"COPY docker/healthcheck.py {HEALTHCHECK_IN_IMAGE}" in DOCKERFILE
    image_check = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", DOCKERFILE, flags=re.M)
    assert yaml.safe_load(image_check.group(1))[-1] == "api", "the image's own check is the default command's"
    for name, svc in APP_SERVICES.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[:3] == ["CMD", "python", HEALTHCHECK_IN_IMAGE], f"{name} has no check of its own"
        role, args = test[3], test[4:]
        assert role == role_of(svc), f"{name} runs a {role_of(svc)} but checks {role}"
        check, nargs = HEALTH.CHECKS[role]
        assert len(args) == nargs, f"{name}: {role} takes {nargs} arguments"
        if role == "ray":
            assert args[0].endswith(f":{head_port()}")
        if role in ("api", "dashboard"):
            # The checks probe the ports these roles listen on by default in the image (8000, 8080).
            assert option(commands(svc)[-1], "--port") == {"api": "8000", "dashboard": "8080"}[role]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/healthz" or self.headers.get("Authorization") == "Basic dTpw":   # u:p
            self.send_response(200)
        else:
            self.send_response(401 if self.path == "/" else 500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_port():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_http_checks(http_port, monkeypatch):
    assert HEALTH.check_http(http_port, "/healthz") is None
    assert "answered 500" in HEALTH.check_http(http_port, "/other")
    assert "answered 401" in HEALTH.check_http(http_port, "/")
    assert HEALTH.check_http(http_port, "/", auth=("u", "p")) is None
    monkeypatch.setenv("S3S_HEALTH_PORT", str(http_port))
    monkeypatch.setenv("S3S_DASHBOARD_USER", "u")
    monkeypatch.setenv("S3S_DASHBOARD_PASSWORD", "p")
    assert HEALTH.main(["dashboard"]) == 0 and HEALTH.main(["api"]) == 0
    monkeypatch.setenv("S3S_DASHBOARD_PASSWORD", "wrong")
    assert HEALTH.main(["dashboard"]) == 1
    assert HEALTH.main(["ray"]) == 2 and HEALTH.main(["nothing"]) == 2
    monkeypatch.setenv("S3S_HEALTH_PORT", "1")             # nothing listens there
    assert HEALTH.main(["api"]) == 1


def test_process_checks(tmp_path):
    def process(pid: int, *argv: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    (tmp_path / "self").mkdir()
    process(7, "/opt/venv/bin/python", "/opt/venv/bin/s3search", "dashboard", "--port", "8080")
    assert "no process" in HEALTH.check_process(("s3search", "runner"), tmp_path)
    process(9, "/opt/venv/bin/python", "/opt/venv/bin/s3search", "runner", "--evaluator", "ray")
    assert HEALTH.check_process(("s3search", "runner"), tmp_path) is None
    assert "raylet" in HEALTH.check_ray("ray-head:6379", proc=tmp_path)     # no raylet: unhealthy, ray not run
    process(11, "/opt/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=x")
    assert HEALTH.check_process(("raylet",), tmp_path) is None


# ----- network exposure -----------------------------------------------------------------------------------------
def test_published_ports_are_loopback_only():
    api_port = option(commands(APP_SERVICES["api"])[-1], "--port")
    assert APP_SERVICES["api"]["ports"] == [f"127.0.0.1:{api_port}:{api_port}"]
    assert all(str(p).startswith("127.0.0.1:") for p in COMPOSE["services"]["proxy"]["ports"])
    for name, svc in COMPOSE["services"].items():
        if name not in ("api", "proxy"):
            assert "ports" not in svc, f"{name} must not be published"


def test_dashboard_is_behind_the_proxy_with_its_own_auth():
    dash = APP_SERVICES["dashboard"]
    dash_cmd = commands(dash)[-1]
    # Bound to 0.0.0.0 the dashboard refuses to start without a password (studies.dashboard), so compose must
    # require one; it then checks the credentials itself and the proxy only forwards them.
    assert "S3S_DASHBOARD_PASSWORD" in dash["environment"]
    assert "--allow-writes" not in dash_cmd
    nginx = (DOCKER / "proxy" / "nginx.conf").read_text()
    assert f"proxy_pass           http://dashboard:{option(dash_cmd, '--port')};" in nginx
    assert "auth_basic " not in nginx


# ----- what the image installs ------------------------------------------------------------------------------------
def test_image_installs_every_extra_its_roles_need():
    installs = re.findall(r'pip install ([^\n\\]*)', DOCKERFILE)
    extras = set()
    for line in installs:
        for group in re.findall(r'"\.\[([^\]]+)\]"', line):
            extras |= {e.strip() for e in group.split(",")}
    # service: API, runner, dashboard, Ray; diffusers: UNet and pipeline models (S3Scheduler too).
    assert {"service", "diffusers"} <= extras
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert any(r.startswith("diffusers") for r in optional["diffusers"])
    assert any(r.startswith("fastapi-offline") for r in optional["service"])
    # FID: the same torch-fidelity as CI, without dependencies (its torchvision would not match the torch).
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r'"torch-fidelity==([^"]+)"', makefile).group(1)
    assert re.search(rf'pip install --no-deps "torch-fidelity=={re.escape(pinned)}"', DOCKERFILE)
    assert any(r.startswith("torch-fidelity") for r in optional["fid"])


def test_torch_comes_first_at_the_tested_version_from_an_index_that_has_it():
    constraint = (REPO / ".ci" / "constraints.txt").read_text()
    version = re.search(r"^torch==(\d+\.\d+)\.\d+$", constraint, flags=re.M).group(1)
    assert version in TORCH_INDEX_VARIANTS, f"torch {version}: list its wheel index variants above"
    default = re.search(r"^ARG TORCH_INDEX=(\S+)$", DOCKERFILE, flags=re.M).group(1)
    build = COMPOSE["x-app"]["build"]["args"]["TORCH_INDEX"]
    for index in (default, build):
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/(\w+)", index), index
        assert index.rsplit("/", 1)[1] in TORCH_INDEX_VARIANTS[version], f"{index} has no torch {version}"
    assert default.endswith("/cpu")
    torch_line = re.search(r"pip install --index-url \$\{TORCH_INDEX\} -c \.ci/constraints\.txt torch\b", DOCKERFILE)
    later = DOCKERFILE.index('".[service')
    assert torch_line and torch_line.start() < later, "torch must be installed (from TORCH_INDEX) before the rest"
    assert DOCKERFILE.count("-c .ci/constraints.txt") >= 2, "later installs must keep the same torch"
