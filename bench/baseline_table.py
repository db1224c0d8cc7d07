"""Every baseline on its best grid, per built-in model: metric at NFE 3..10, the 1000-step value and the floor.

    OMP_NUM_THREADS=1 python bench/baseline_table.py run [--models gmm-64d digits ...] [--n 1000]
    python bench/baseline_table.py report > docs/bench/baselines_per_model.md

`run` evaluates each registered baseline on each standard grid (`baselines_seed.SEED_GRIDS`) at every NFE it
can make exactly, through the project's `LocalEvaluator` (search split,
seed 0, the model's default metric). Results go to docs/bench/baseline_table/<model>.json after every model, so
a run can be resumed model by model. `report` keeps, per baseline and NFE, the best grid and prints one markdown
table per model next to a 1000-step value (DPM-Solver++(2M), 1000 steps on the logSNR grid, same split) and
the floor (the metric of n samples of the target itself: exact mixture samples, or held-out real digits).
Every figure printed comes from the JSON files this script wrote; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from s3search import baselines, metrics
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.evaluation.reference import load_or_compute
from s3search.models import registry
from s3search.search.baselines_seed import SEED_GRIDS, on_grids, parse_label

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "baseline_table"
NFES = (3, 4, 5, 6, 8, 10)
FLOOR_SEED = 987_654_321


def floor_value(model_name: str, metric_name: str, n: int, ev: LocalEvaluator) -> float:
    """The metric of n draws of the target itself (a seed no evaluation uses): what a perfect sampler scores."""
    model = registry.get(model_name)
    metric = metrics.get(metric_name)
    ref = load_or_compute(model, metric, n, 0, "search", root=ev.cache_dir) if metric.needs_reference else {}
    target = model.reference_sampler(n, torch.Generator().manual_seed(FLOOR_SEED))
    return float(metric.compute(target, metrics.MetricContext(model, ref)))


def run_model(model_name: str, n: int, fine_steps: int, ev: LocalEvaluator) -> dict:
    model = registry.get(model_name)
    metric = model.default_metric
    process = model.process.name
    req = EvalRequest(model_name, metric, n, seed=0, split="search")
    rows, started = [], time.perf_counter()
    for name in baselines.names():
        for nfe in NFES:
            # The grids on which this baseline makes exactly `nfe` evaluations, as the search seeds them.
            cands = on_grids([name], nfe, process, grid_names=SEED_GRIDS)
            for c, res in zip(cands, ev.evaluate([c.schedule for c in cands], req)):
                rows.append({"baseline": name, "nfe": nfe, "grid": parse_label(c.label)[1], "ok": res.ok,
                             "value": res.value if res.ok else None, "seconds": res.seconds,
                             "error": None if res.ok else res.error})
        print(f"  {model_name}: {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    fine = baselines.for_nfe("dpmpp_2m", fine_steps, process, grid="logsnr")
    (fine_res,) = ev.evaluate([fine], req)
    return {"model": model_name, "process": process, "metric": metric, "n": n, "split": "search", "seed": 0,
            "grids": list(SEED_GRIDS), "rows": rows,
            "fine": {"steps": fine_steps, "nfe": fine.nfe, "value": fine_res.value, "seconds": fine_res.seconds},
            "floor": floor_value(model_name, metric, n, ev),
            "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started}


def cmd_run(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ev = LocalEvaluator(cache_dir=tempfile.mkdtemp(prefix="s3search-bench-"), batch_size=1024)
    for name in args.models:
        path = OUT / f"{name}.json"
        if path.exists() and not args.force:
            print(f"{name}: {path} exists (use --force to re-measure)", file=sys.stderr)
            continue
        doc = run_model(name, args.n, args.fine_steps, ev)
        path.write_text(json.dumps(doc, indent=1))
        print(f"{name}: {len(doc['rows'])} evaluations in {doc['wall_s']:.0f} s -> {path}", file=sys.stderr,
              flush=True)


def best_grids(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(baseline, NFE) -> its best-scoring grid's row (failed or non-finite runs never win)."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if not r["ok"] or r["value"] is None or not math.isfinite(r["value"]):
            continue
        key = (r["baseline"], r["nfe"])
        if key not in best or r["value"] < best[key]["value"]:
            best[key] = r
    return best


def render(doc: dict) -> str:
    best = best_grids(doc["rows"])
    names = sorted({r["baseline"] for r in doc["rows"]})
    secs = [r["seconds"] for r in doc["rows"] if r["ok"]]
    lines = [f"### {doc['model']} ({doc['process']}), metric `{doc['metric']}`, n = {doc['n']}", "",
             f"Grids tried: {', '.join(doc['grids'])}. Each cell: the value on the baseline's best grid at that NFE "
             "(the grid in brackets); — where the baseline cannot make exactly that NFE.", "",
             "| baseline | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
             "|---|" + "---|" * len(NFES)]
    for name in names:
        cells = []
        for k in NFES:
            r = best.get((name, k))
            cells.append(f"{r['value']:.4g} ({r['grid']})" if r else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    winners = []
    for k in NFES:
        at_k = [r for (b, nfe), r in best.items() if nfe == k]
        if at_k:
            w = min(at_k, key=lambda r: r["value"])
            winners.append(f"NFE {k}: {w['baseline']}@{w['grid']} {w['value']:.4g}")
    fine = doc["fine"]
    lines += ["", "Best baseline per NFE: " + "; ".join(winners) + ".",
              f"1000-step value (dpmpp_2m, {fine['steps']} steps on the logSNR grid): {fine['value']:.4g} "
              f"({fine['seconds']:.0f} s). Floor (n target samples): {doc['floor']:.4g}. "
              f"{len(doc['rows'])} evaluations, {sum(secs) / max(len(secs), 1):.2f} s per candidate on average "
              f"(torch {doc['torch']}, {doc['threads']} thread(s))."]
    return "\n".join(lines)


def cmd_report(args) -> None:
    docs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    print("# Every baseline on its best grid, per built-in model\n")
    print("Generated by `python bench/baseline_table.py report` from the JSON files that "
          "`OMP_NUM_THREADS=1 python bench/baseline_table.py run` wrote (docs/bench/baseline_table/). Search split, "
          "seed 0, lower is better.\n")
    for doc in docs:
        print(render(doc) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", nargs="+", default=registry.names())
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--fine-steps", type=int, default=1000)
    r.add_argument("--force", action="store_true")
    r.set_defaults(fn=cmd_run)
    sub.add_parser("report").set_defaults(fn=cmd_report)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
