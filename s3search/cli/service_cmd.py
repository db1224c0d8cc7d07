"""Service commands: serve, runner, dashboard, migrate, keys (admin, on the database) and submit, status,
export (clients of the REST API)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..search.config import field_default

__all__ = ["register", "parse_nfe"]

DB_HELP = "database URL (default: $DATABASE_URL, else sqlite:///s3search.db)"
SERVER_HELP = "API base URL"
KEY_HELP = "API key (shown once by `s3search keys create`)"
FINAL = ("succeeded", "failed", "cancelled")


def _db_option() -> Any:
    return typer.Option(None, "--database-url", envvar="DATABASE_URL", help=DB_HELP)


def _server_option() -> Any:
    return typer.Option("http://127.0.0.1:8000", "--server", envvar="S3S_SERVER", help=SERVER_HELP)


def _key_option() -> Any:
    return typer.Option(..., "--key", envvar="S3S_API_KEY", help=KEY_HELP)


def parse_nfe(text: str) -> Any:
    """"5" -> 5; "4,5,6" -> [4, 5, 6]; "4-6" -> {"min": 4, "max": 6}."""
    text = text.strip()
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            return {"min": int(lo), "max": int(hi)}
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"nfe={text!r}: write 5, 4,5,6 or 4-6", param_hint="--nfe") from None


# ----- server side ---------------------------------------------------------------------------------------
def serve(host: str = typer.Option("127.0.0.1", "--host", help="bind address"),
          port: int = typer.Option(8000, "--port"),
          database_url: Optional[str] = _db_option(),
          workers: int = typer.Option(1, "--workers", min=1, help="uvicorn worker processes"),
          log_level: str = typer.Option("info", "--log-level")) -> None:
    """Run the REST API (uvicorn). Migrates the database on start."""
    import uvicorn

    from api.app import head_limit, http_protocol
    from api.settings import Settings

    if database_url:
        os.environ["DATABASE_URL"] = database_url
    from studies.migrate import upgrade
    upgrade(database_url)           # once, before the workers start
    os.environ["S3S_MIGRATE_ON_START"] = "false"
    # The server bounds the whole head so a huge header is cut off while it arrives, not after it is read.
    uvicorn.run("api.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level,
                http=http_protocol(), h11_max_incomplete_event_size=head_limit(Settings().max_header_bytes))


def runner(database_url: Optional[str] = _db_option(),
           runner_id: Optional[str] = typer.Option(None, "--id", help="runner name (default host:pid:random)"),
           once: bool = typer.Option(False, "--once", help="run at most one job, then exit"),
           max_jobs: Optional[int] = typer.Option(None, "--max-jobs", min=1),
           heartbeat: Optional[float] = typer.Option(None, "--heartbeat", help="seconds between heartbeats"),
           stale_after: Optional[float] = typer.Option(None, "--stale-after",
                                                      help="seconds without heartbeat before a job is resumed"),
           evaluator: Optional[str] = typer.Option(None, "--evaluator", help="local | ray (default: $S3S_EVALUATOR, "
                                                   "else local; ray joins $RAY_ADDRESS or starts an embedded Ray)"),
           no_cache: bool = typer.Option(False, "--no-cache", help="do not use the database's evaluation cache")
           ) -> None:
    """Claim queued jobs from the database and run their searches. SIGTERM gives the current job back."""
    import logging

    from api.settings import Settings

    from studies.runner import Runner, RunnerOptions, evaluator_factory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(**({"database_url": database_url} if database_url else {}))
    if settings.model_registry:
        os.environ.setdefault("S3SEARCH_MODEL_REGISTRY", settings.model_registry)
    options = RunnerOptions(heartbeat_interval_s=heartbeat or settings.heartbeat_interval_s,
                            stale_after_s=stale_after or settings.stale_after_s,
                            poll_interval_s=settings.poll_interval_s, max_attempts=settings.max_attempts)
    r = Runner(settings.database_url, runner_id=runner_id, options=options)
    kind = evaluator or settings.evaluator
    try:
        r.evaluator_factory = evaluator_factory(kind, None if no_cache or not settings.eval_cache else r.sessions)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--evaluator") from None

    def _stop(signum: int, _frame: Any) -> None:
        typer.echo(f"runner {r.runner_id}: signal {signum}, stopping", err=True)
        r.shutdown.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    typer.echo(f"runner {r.runner_id} on {r.engine.url.render_as_string(hide_password=True)}", err=True)
    try:
        done = r.run_forever(max_jobs=1 if once else max_jobs)
    finally:
        r.close()
    typer.echo(f"runner {r.runner_id}: {done} job(s) run", err=True)


def dashboard(database_url: Optional[str] = _db_option(),
              host: str = typer.Option("127.0.0.1", "--host", help="bind address; any but loopback needs "
                                                                   "$S3S_DASHBOARD_PASSWORD"),
              port: int = typer.Option(8080, "--port"),
              allow_writes: bool = typer.Option(False, "--allow-writes",
                                                help="let the dashboard rename and delete studies, edit notes "
                                                     "and tell trials (it is read-only without this)")) -> None:
    """optuna-dashboard on the service database, read-only: one study per job, named s3s-job-<id>. With
    $S3S_DASHBOARD_PASSWORD set it asks for HTTP basic auth (user $S3S_DASHBOARD_USER, default s3search)."""
    from api.settings import Settings
    from studies.dashboard import Credentials, check_exposure, dashboard_app, serve
    from studies.migrate import upgrade
    from studies.optuna_storage import optuna_storage

    settings = Settings(**({"database_url": database_url} if database_url else {}))
    secret = settings.dashboard_password
    credentials = Credentials(settings.dashboard_user, secret.get_secret_value()) if secret else None
    try:
        check_exposure(host, credentials)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--host") from None
    upgrade(settings.database_url)
    app = dashboard_app(optuna_storage(settings.database_url), allow_writes=allow_writes, credentials=credentials)
    typer.echo(f"dashboard on http://{host}:{port} ({'writes allowed' if allow_writes else 'read-only'}, "
               f"{'basic auth' if credentials else 'no auth'})", err=True)
    serve(app, host, port)


def migrate(database_url: Optional[str] = _db_option()) -> None:
    """Bring the service tables to the newest revision (serve and runner also do this on start)."""
    from studies.db import database_url as resolve
    from studies.migrate import head_revision, upgrade

    upgrade(database_url)
    typer.echo(f"{resolve(database_url).split('@')[-1]} at revision {head_revision()}")


keys_app = typer.Typer(help="Create, list and revoke API keys (admin; talks to the database directly).",
                       no_args_is_help=True)


@keys_app.command("create")
def keys_create(owner: str = typer.Argument(..., help="owner name: jobs are visible to all of an owner's keys"),
                label: str = typer.Option("", "--label"), database_url: Optional[str] = _db_option()) -> None:
    """Create a key and print it once; only its salted HMAC is stored."""
    from studies.db import make_engine, make_session_factory
    from studies.keys import create_key
    from studies.migrate import upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    try:
        with make_session_factory(engine)() as s:
            row, key = create_key(s, owner, label)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="OWNER") from None
    finally:
        engine.dispose()
    typer.echo(key)
    typer.echo(f"key id {row.id} for owner {row.owner}; store it now, it is not shown again", err=True)


@keys_app.command("list")
def keys_list(owner: Optional[str] = typer.Option(None, "--owner"), database_url: Optional[str] = _db_option()) -> None:
    from studies.db import make_engine, make_session_factory
    from studies.keys import list_keys

    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        for k in list_keys(s, owner):
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            typer.echo(f"{k.id}  {k.owner:<20} {state:<24} {k.label}")
    engine.dispose()


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key id (12 hex digits) or the whole key"),
                database_url: Optional[str] = _db_option()) -> None:
    from studies.db import make_engine, make_session_factory
    from studies.keys import key_id_of, revoke_key

    # Only the id is ever printed: the argument may be the whole key, and terminals and CI logs keep output.
    kid = key_id_of(key_id)
    if kid is None:
        raise typer.BadParameter("give the key id (12 hex digits, see `s3search keys list`) or the whole key",
                                 param_hint="KEY_ID")
    engine = make_engine(database_url)
    with make_session_factory(engine)() as s:
        ok = revoke_key(s, kid)
    engine.dispose()
    if not ok:
        typer.echo(f"no active key {kid}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {kid}")


# ----- clients of the API --------------------------------------------------------------------------------
def _client(server: str, key: str) -> Any:
    import httpx

    return httpx.Client(base_url=server.rstrip("/"), headers={"X-API-Key": key}, timeout=30.0)


def _check(r: Any) -> Any:
    if r.status_code >= 400:
        try:
            body = r.json()
            detail = body.get("detail", body)
            fields = ", ".join(f"{e['field']}: {e['message']}" for e in body.get("errors", []))
        except ValueError:
            detail, fields = r.text, ""
        typer.echo(f"error {r.status_code}: {detail}" + (f" ({fields})" if fields else ""), err=True)
        raise typer.Exit(2)
    return r.json()


def _summary(job: dict[str, Any]) -> str:
    p = job["progress"]
    best = job.get("best") or {}
    line = f"{job['id']}  {job['status']:<10} {p['evaluations']}/{p['budget']} evaluations"
    if best.get("value") is not None:
        line += f"  best(search split) {best['value']:.6g}"
    if job.get("error"):
        line += f"  error: {job['error']}"
    return line


def _wait(client: Any, job_id: str, poll: float, timeout: Optional[float]) -> dict[str, Any]:
    start = time.monotonic()
    last = ""
    while True:
        job = _check(client.get(f"/v1/jobs/{job_id}"))
        line = _summary(job)
        if line != last:
            typer.echo(line, err=True)
            last = line
        if job["status"] in FINAL:
            return job
        if timeout is not None and time.monotonic() - start > timeout:
            typer.echo(f"still {job['status']} after {timeout:g} s", err=True)
            raise typer.Exit(3)
        time.sleep(poll)


def submit(model: str = typer.Option(..., "--model"), nfe: str = typer.Option(..., "--nfe", help="5, 4,5,6 or 4-6"),
           budget: int = typer.Option(field_default("budget"), "--budget"),
           metric: Optional[str] = typer.Option(None, "--metric", help="default: the model's own default metric"),
           n_samples: int = typer.Option(field_default("n_samples"), "--samples"),
           n_test_samples: int = typer.Option(field_default("n_test_samples"), "--test-samples"),
           method: str = typer.Option(field_default("method"), "--method"),
           predictor: str = typer.Option(field_default("predictor"), "--predictor"),
           seed: int = typer.Option(field_default("seed"), "--seed"),
           prompt_set: Optional[str] = typer.Option(None, "--prompt-set",
                                                    help="text-to-image models: a prompt set of the model"),
           guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale",
                                                          help="text-to-image models: guidance scale"),
           option: list[str] = typer.Option([], "--option", help="KEY=JSON, repeatable (search options)"),
           idempotency_key: Optional[str] = typer.Option(None, "--idempotency-key"),
           wait: bool = typer.Option(False, "--wait", help="poll until the job ends, then print its result"),
           poll: float = typer.Option(2.0, "--poll"), timeout: Optional[float] = typer.Option(None, "--timeout"),
           server: str = _server_option(), key: str = _key_option()) -> None:
    """Submit a search job to the server; prints the job id (and with --wait, the result as JSON)."""
    options: dict[str, Any] = {}
    for item in option:
        k, sep, v = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: write KEY=VALUE", param_hint="--option")
        try:
            options[k] = json.loads(v)
        except ValueError:
            options[k] = v
    body = {"model": model, "nfe": parse_nfe(nfe), "budget": budget, "n_samples": n_samples,
            "n_test_samples": n_test_samples, "method": method, "predictor": predictor, "seed": seed,
            "options": options}
    if metric is not None:          # unset: the server picks the model's default, as `s3search search` does
        body["metric"] = metric
    body.update({k: v for k, v in (("prompt_set", prompt_set), ("guidance_scale", guidance_scale)) if v is not None})
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(server, key) as c:
        job = _check(c.post("/v1/jobs", json=body, headers=headers))
        typer.echo(job["id"])
        if wait:
            job = _wait(c, job["id"], poll, timeout)
            typer.echo(json.dumps({"status": job["status"], "result": job["result"], "error": job["error"]},
                                  indent=2))
            if job["status"] != "succeeded":
                raise typer.Exit(1)


def status(job_id: Optional[str] = typer.Argument(None, help="a job id; none lists your jobs"),
           as_json: bool = typer.Option(False, "--json"), wait: bool = typer.Option(False, "--wait"),
           poll: float = typer.Option(2.0, "--poll"), timeout: Optional[float] = typer.Option(None, "--timeout"),
           server: str = _server_option(), key: str = _key_option()) -> None:
    """Show a job (or your recent jobs)."""
    with _client(server, key) as c:
        if job_id is None:
            page = _check(c.get("/v1/jobs"))
            for job in page["items"]:
                typer.echo(json.dumps(job) if as_json else _summary(job))
            return
        job = _wait(c, job_id, poll, timeout) if wait else _check(c.get(f"/v1/jobs/{job_id}"))
        typer.echo(json.dumps(job, indent=2) if as_json else _summary(job))


def export(job_id: Optional[str] = typer.Argument(None, help="a job id: fetch its best schedule from the server"),
           format: str = typer.Option("json", "--format", "-f", help="json | diffusers | k-diffusion | comfyui"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="write here instead of standard output"),
           schedule: Optional[Path] = typer.Option(None, "--schedule", "-s",
                                                   help="export a local schedule file instead (no server)"),
           field: Optional[str] = typer.Option(None, "--field", help="with --schedule: print only this field"),
           server: str = _server_option(),
           key: Optional[str] = typer.Option(None, "--key", envvar="S3S_API_KEY", help=KEY_HELP)) -> None:
    """Export a job's best schedule (from the server), or a local schedule file with --schedule."""
    if schedule is not None:
        if job_id is not None:
            raise typer.BadParameter("give a job id or --schedule, not both", param_hint="--schedule")
        from .export_cmd import export_command
        export_command(schedule=schedule, format=format, field=field, out=out)
        return
    if job_id is None or key is None:
        raise typer.BadParameter("a job id and --key (or $S3S_API_KEY) are needed, or --schedule FILE",
                                 param_hint="JOB_ID")
    with _client(server, key) as c:
        doc = _check(c.get(f"/v1/jobs/{job_id}/schedule", params={"format": format}))
    from .export_cmd import emit

    emit(json.dumps(doc, indent=2), out)


def results(job_id: str = typer.Argument(..., help="a finished job's id"),
            out: Path = typer.Option(Path("results"), "--out", "-o",
                                     help="a folder (the file is <job id>.json in it) or a .json file"),
            server: str = _server_option(), key: str = _key_option()) -> None:
    """Save a finished job's results file (what `s3search plots --results` draws)."""
    with _client(server, key) as c:
        doc = _check(c.get(f"/v1/jobs/{job_id}/results"))
    path = out if out.suffix == ".json" else out / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    typer.echo(f"wrote {path} (plot it: s3search plots --results {path})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("runner")(runner)
    app.command("dashboard")(dashboard)
    app.command("migrate")(migrate)
    app.add_typer(keys_app, name="keys")
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("export")(export)
    app.command("results")(results)
