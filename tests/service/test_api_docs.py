"""/docs and /redoc work offline: their scripts and styles come from the API itself, and a real browser renders
every operation with nothing but the server on 127.0.0.1 reachable."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.docs import ASSETS, STATIC_PREFIX
from api.settings import Settings

from .procs import cli, cli_env, free_port, stop, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    db = tmp_path_factory.mktemp("docs") / "docs.db"
    return TestClient(create_app(Settings(database_url=f"sqlite:///{db}")))


def operation_ids(client: TestClient) -> list[str]:
    schema = client.get("/openapi.json").json()
    return [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_nothing_from_another_host(client, page):
    html = client.get(page).text
    assert client.get(page).status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: ?["']([^"']+)""", html)
    assert urls, html
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from another host"
    assert "fonts.googleapis" not in html and "cdn.jsdelivr" not in html


@pytest.mark.parametrize("role, kind", [("swagger_js", "javascript"), ("swagger_css", "css"),
                                        ("redoc_js", "javascript"), ("favicon", "image/png")])
def test_assets_are_served(client, role, kind):
    r = client.get(f"{STATIC_PREFIX}/{ASSETS[role]}")
    assert r.status_code == 200
    assert kind in r.headers["content-type"]
    assert len(r.content) > 1000
    if role == "swagger_js":
        assert b"SwaggerUIBundle" in r.content
    if role == "redoc_js":
        assert b"Redoc" in r.content
    if role == "swagger_css":
        assert b".swagger-ui" in r.content


def test_docs_routes_are_not_operations(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith(("/docs", "/redoc", "/static")) for p in paths)
    assert client.get("/docs/oauth2-redirect").status_code == 200


# ----- a real browser against a real server -----------------------------------------------------------------
def render(url: str, out: Path, *, screenshot: Path | None = None) -> str:
    """The DOM after Chromium ran the page's scripts; every host but 127.0.0.1 is unresolvable."""
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={out / 'chromium-profile'}", "--window-size=1280,2000", "--virtual-time-budget=15000",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
    if screenshot is not None:
        subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    done = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("docs-server")
    port = free_port()
    proc = cli(["serve", "--port", str(port)], cli_env(f"sqlite:///{tmp / 'docs.db'}"), log=tmp / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        stop(proc)


def test_swagger_ui_renders_every_operation(server, client):
    base, tmp = server
    shot = tmp / "docs.png"
    dom = render(f"{base}/docs", tmp, screenshot=shot)
    assert shot.stat().st_size > 20_000          # a blank page compresses to a few kB
    assert 'class="swagger-ui' in dom, dom[:2000]
    for op_id in operation_ids(client):
        # Swagger UI gives each operation block the id operations-<tag>-<operationId>.
        assert re.search(rf'id="operations-[^"]*-{re.escape(op_id)}"', dom), f"{op_id} not rendered"
    assert "Submit Job" in dom and "/v1/jobs/{job_id}/schedule" in dom
    assert "Authorize" in dom


def test_redoc_renders_every_operation(server, client):
    base, tmp = server
    dom = render(f"{base}/redoc", tmp)
    for op_id in operation_ids(client):
        assert f"operation/{op_id}" in dom, f"{op_id} not rendered by ReDoc"
