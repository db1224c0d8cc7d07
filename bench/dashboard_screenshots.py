"""Screenshots of optuna-dashboard on a real search study, as a person opening the dashboard would see it.

Runs a short search (`run_search`, the local evaluator) into a SQLite file, writes the study's note and
history-by-NFE figure as the CLI and the service do, serves the dashboard (`studies.dashboard`) on a loopback
port and has headless Chromium take a screenshot of the study's pages: its top page (history, parameter
importance, the history by NFE), the analytics page (slice plots) and the note.

    .venv/bin/python bench/dashboard_screenshots.py --out /tmp/dashboard-shots
    .venv/bin/python bench/dashboard_screenshots.py --out docs/bench --prefix dashboard_ --pages top note

Needs the Debian package `chromium`; about a minute on two cores.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from s3search.models import registry  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402
from s3search.search.study_note import publish_study_note  # noqa: E402
from studies.dashboard import dashboard_app, serve  # noqa: E402

PAGES = {"top": "", "analytics": "/analytics", "note": "/note", "trials": "/trials"}


def build_study(db: Path, model: str, nfe: list[int], budget: int, n_samples: int, method: str,
                with_spec: bool = False) -> optuna.Study:
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name=f"{model}-nfe{'-'.join(map(str, nfe))}-{method}", storage=url,
                                direction="minimize", load_if_exists=True)
    config = SearchConfig(model=model, nfe=tuple(nfe), budget=budget, n_samples=n_samples,
                          n_test_samples=2 * n_samples, method=method, seed=0)
    config = config.with_model_defaults(registry.get(model).default_metric)   # the note names the metric
    started = time.perf_counter()
    result = run_search(config, study)
    print(f"search: {result.evaluations} evaluations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    # With the spec, the note is the service's (the runner shows the submitted document too).
    publish_study_note(study, config, result, title=f"s3search study `{study.study_name}`",
                       spec=config.to_dict() if with_spec else None)
    return study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def screenshot(chromium: str, url: str, out: Path, profile: Path, width: int, height: int) -> None:
    # Every host but 127.0.0.1 unresolvable: the page must render from what the dashboard serves.
    cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
           "--virtual-time-budget=20000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           f"--screenshot={out}", url]
    subprocess.run(cmd, capture_output=True, timeout=180, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dashboard-shots")
    ap.add_argument("--prefix", default="", help="file-name prefix of the screenshots")
    ap.add_argument("--model", default="gmm-8x4")
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--method", default="s3")
    ap.add_argument("--pages", nargs="+", default=list(PAGES), choices=list(PAGES))
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1600)
    ap.add_argument("--spec", action="store_true", help="the service's note: with the job spec as JSON")
    ap.add_argument("--db", type=Path, default=None, help="reuse this SQLite file (its study is resumed)")
    args = ap.parse_args(argv)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (Debian package `chromium`)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "study.db"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = build_study(db, args.model, args.nfe, args.budget, args.n_samples, args.method, args.spec)
        port = free_port()
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        threading.Thread(target=serve, args=(dashboard_app(storage), "127.0.0.1", port), daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/studies")
        for page in args.pages:
            out = args.out / f"{args.prefix}{page}.png"
            screenshot(chromium, f"{base}/dashboard/studies/{study._study_id}{PAGES[page]}", out,
                       Path(tmp) / "profile", args.width, args.height)
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
