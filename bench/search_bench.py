"""Search benchmark: searched schedule vs every baseline, search efficiency, predictor quality.

    # searched vs best baseline at each NFE, test split, excess over the 1000-step value
    python bench/search_bench.py quality --model gmm-64d --nfe 4,5,6,8,10 --budget 200
    # add every baseline on every grid (test split) to stored runs: the yardstick of the excess ratio
    python bench/search_bench.py yardstick --model gmm-64d --tag=-n3000
    # best-so-far against true evaluations for S³, random, TPE, CMA-ES (+ random at a larger budget)
    python bench/search_bench.py efficiency --model gmm-64d --nfe 5 --budget 200 --random-budget 1000
    # Kendall tau / top-k recall of every predictor on held-out schedules (uses the efficiency run's pairs)
    python bench/search_bench.py predictors --model gmm-64d --nfe 5
    python bench/search_bench.py plot --model gmm-64d --nfe 5

Every run uses the real LocalEvaluator and an in-memory Optuna study (the SQLite file adds ~20 ms per commit on
this machine and does not change what is measured). Results go to docs/bench/search_*.json; `report` prints the
markdown tables from them. Each figure printed is measured by the run that prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import predictors  # noqa: E402
from s3search import baselines  # noqa: E402
from s3search.evaluation.base import EvalRequest  # noqa: E402
from s3search.evaluation.local import LocalEvaluator  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.search.config import SearchConfig  # noqa: E402
from s3search.search.run import run_search  # noqa: E402
from s3search.search.baselines_seed import on_grids  # noqa: E402
from s3search.search.study import ATTR, schedule_from_json  # noqa: E402

OUT = ROOT / "docs" / "bench"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _save(name: str, doc: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(doc, indent=1))
    return path


def _load(name: str) -> dict:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else {}


def reference_value(model: str, metric: str, n_test: int, seed: int, steps: int = 1000) -> float:
    """The metric of a 1000-step sampler (DPM-Solver++(2M), logSNR grid) on the test split."""
    spec = registry.get(model)
    sched = baselines.get("dpmpp_2m", _logsnr(spec.process, steps), spec.process.name)
    res = LocalEvaluator().evaluate([sched], EvalRequest(model, metric, n_test, seed, "test"))[0]
    if not res.ok:
        raise RuntimeError(f"reference failed: {res.error}")
    return float(res.value)


def all_grid_baselines(model: str, metric: str, nfe: int, n_test: int, seed: int) -> dict[str, float]:
    """Every baseline on every standard grid at this NFE, on the test split: label -> value.

    The search itself tries only the best few baselines on the other grids; the benchmark's yardstick is the
    best of all of them, so a baseline the search's seeding left on its conventional grid cannot be missed.
    """
    spec = registry.get(model)
    cands = on_grids(baselines.names(), nfe, spec.process.name)
    results = LocalEvaluator().evaluate([c.schedule for c in cands], EvalRequest(model, metric, n_test, seed, "test"))
    return {c.label: float(r.value) for c, r in zip(cands, results) if r.ok}


def _yardstick(run: dict) -> tuple[str, float]:
    """The best baseline: over the search's own baseline grids and, where measured, every standard grid."""
    pool = {**run["baselines_test"], **(run.get("baselines_all_grids") or {})}
    return min(pool.items(), key=lambda kv: kv[1])


def _target(nfe: int) -> float:
    """The issue's excess-ratio target: 0.3 at NFE 4-6, 0.6 at NFE 8-10."""
    return 0.3 if nfe <= 6 else 0.6


def _judged(run: dict, reference: float) -> tuple[str, float, float]:
    """(best baseline, its value, excess ratio) of a stored run, from its stored values and `reference`."""
    name, base = _yardstick(run)
    return name, base, excess_ratio(run["test_value"], base, reference)


def excess_ratio(searched: float, best_baseline: float, reference: float) -> float:
    """(searched - 1000-step) / (best baseline - 1000-step); nan where the baseline is not above the reference."""
    return (searched - reference) / (best_baseline - reference) if best_baseline > reference else math.nan


def _logsnr(process, n: int) -> list[float]:
    from s3search import grids

    return list(grids.logsnr(process, n))


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=JSON")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value   # a bare string


def _config(args, nfe: int, method: str, budget: int, **options) -> SearchConfig:
    spec = registry.get(args.model)
    opts = {"population": args.population, "children": args.population, "generations": args.generations,
            "batch_size": args.batch, **args.option, **options}
    if args.recompute_reference:   # the model's weights were re-saved since the cached reference statistics
        opts["evaluator"] = {"recompute_reference": True}
    return SearchConfig(model=args.model, nfe=(nfe,), metric=args.metric or spec.default_metric,
                        n_samples=args.n_samples, n_test_samples=args.n_test, budget=budget, method=method,
                        predictor=args.predictor, seed=args.seed, options=opts)


def add_one_search_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of a single-NFE search with the gmm-64d quality benchmark's settings (search_structures,
    refine_replay)."""
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--n-samples", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", action="append", default=[], type=_option, metavar="KEY=JSON")


def one_search_config(args, **options) -> SearchConfig:
    """The S³ search of `add_one_search_arguments`: population 128, 4 generations, --option, then `options`."""
    opts = {"population": 128, "children": 128, "generations": 4, **dict(args.option), **options}
    return SearchConfig(model=args.model, nfe=(args.nfe,), metric=registry.get(args.model).default_metric,
                        n_samples=args.n_samples, n_test_samples=args.n_test, budget=args.budget, method="s3",
                        seed=args.seed, options=opts)


def _all_grids(args, metric: str, nfe: int) -> dict[str, float]:
    """Every baseline on every grid (test split), taken from --yardstick-from's run at this NFE when that run
    used the same model, metric, seed and test sample count, else computed. Recomputed after the UniC fold and
    the compiled per-row noise, the stored gmm-64d values agreed to 2e-6 relative (the best of each NFE to 1e-11)."""
    if args.yardstick_from:
        doc = json.loads(Path(args.yardstick_from).read_text())
        run = doc.get("runs", {}).get(str(nfe), {})
        if ((doc.get("model"), doc.get("metric"), doc.get("seed"), run.get("n_test")) ==
                (args.model, metric, args.seed, args.n_test) and run.get("baselines_all_grids")):
            return dict(run["baselines_all_grids"])
        print(f"NFE {nfe}: {args.yardstick_from} has no matching yardstick; computing it", flush=True)
    return all_grid_baselines(args.model, metric, nfe, args.n_test, args.seed)


def _curve(study: optuna.Study) -> list[float]:
    best, out = math.inf, []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if ATTR.SCHEDULE not in t.user_attrs or t.state not in (optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.FAIL):
            continue
        if t.value is not None and t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        out.append(best)
    return out


def cmd_quality(args) -> None:
    key = f"search_quality_{args.model}{args.tag}.json"
    doc = _load(key)
    metric = args.metric or registry.get(args.model).default_metric
    if args.reference is not None:
        doc["reference"] = args.reference
    if "reference" not in doc:
        t = time.perf_counter()
        doc["reference"] = reference_value(args.model, metric, args.n_test, args.seed)
        print(f"1000-step value: {doc['reference']:.6g} ({time.perf_counter() - t:.0f}s)", flush=True)
    _save(key, {**doc, "model": args.model, "metric": metric, "seed": args.seed})
    doc.setdefault("runs", {})
    for nfe in args.nfe:
        if str(nfe) in doc["runs"] and not (args.force or nfe in args.redo):
            continue
        t = time.perf_counter()
        study = optuna.create_study(direction="minimize")
        res = run_search(_config(args, nfe, "s3", args.budget), study)
        ref = doc["reference"]
        run = {
            "nfe": nfe, "budget": args.budget, "evaluations": res.evaluations,
            "search_value": res.best_value, "validation_value": res.validation_value,
            "test_value": res.test_value, "baselines_test": res.baselines,
            "baselines_all_grids": _all_grids(args, metric, nfe),
            "schedule": json.loads(res.best.to_json()), "n_samples": args.n_samples, "n_test": args.n_test,
            "predictor": args.predictor, "options": args.option, "curve": _curve(study),
            "rounds": study.user_attrs.get("rounds", []),
        }
        best_name, best_base, ratio = _judged(run, ref)
        run.update(best_baseline=best_name, best_baseline_test=best_base, excess_ratio=ratio,
                   seconds=time.perf_counter() - t)
        doc["runs"][str(nfe)] = run
        _save(key, {**doc, "model": args.model, "metric": metric, "seed": args.seed})
        print(f"NFE {nfe}: searched {res.test_value:.5g} vs {best_name} {best_base:.5g} (1000-step {ref:.5g}); "
              f"excess ratio {ratio:.3f}; {time.perf_counter() - t:.0f}s", flush=True)


def cmd_yardstick(args) -> None:
    """Add every baseline on every grid (test split, the run's n_test and seed) to stored quality runs."""
    key = f"search_quality_{args.model}{args.tag}.json"
    doc = _load(key)
    if not doc.get("runs"):
        raise SystemExit(f"{key}: no stored runs")
    for nfe, r in sorted(doc["runs"].items(), key=lambda kv: int(kv[0])):
        if r.get("baselines_all_grids") and not args.force:
            continue
        t = time.perf_counter()
        r["baselines_all_grids"] = all_grid_baselines(doc["model"], doc["metric"], int(nfe), r["n_test"], doc["seed"])
        name, base, r["excess_ratio"] = _judged(r, doc["reference"])
        r["best_baseline"], r["best_baseline_test"] = name, base
        _save(key, doc)
        print(f"NFE {nfe}: best of {len(r['baselines_all_grids'])} baseline/grid pairs {name} {base:.5g}; "
              f"searched {r['test_value']:.5g}; {time.perf_counter() - t:.0f}s", flush=True)


def cmd_efficiency(args) -> None:
    nfe = args.nfe[0]
    key = f"search_efficiency_{args.model}_nfe{nfe}.json"
    doc = _load(key)
    doc.setdefault("curves", {})
    plan = [("s3", args.budget), ("tpe", args.budget), ("cmaes", args.budget), ("random", args.random_budget)]
    for method, budget in plan:
        if args.methods and method not in args.methods:
            continue
        label = (method if args.seed == 0 else f"{method}-seed{args.seed}") + ("+baselines" if args.seeded else "")
        if label in doc["curves"] and not args.force:
            continue
        t = time.perf_counter()
        study = optuna.create_study(direction="minimize")
        # Pure search ability by default; --seeded spends the first evaluations of every method on the baselines
        # (only S³ can learn from and mutate them: they have no flat encoding for TPE / CMA-ES).
        res = run_search(_config(args, nfe, method, budget, seed_baselines=args.seeded, test_baselines=False),
                         study)
        doc = {**_load(key), **{k: v for k, v in doc.items() if k != "curves"}}   # other runs may have saved
        doc.setdefault("curves", {})[label] = {"budget": budget, "curve": _curve(study),
                                               "test_value": res.test_value, "seconds": time.perf_counter() - t}
        if method == "random" and args.seed == 0 and not args.seeded:   # the predictor benchmark's pairs
            pairs = [(t.user_attrs[ATTR.SCHEDULE], t.value) for t in study.get_trials(deepcopy=False)
                     if t.state == optuna.trial.TrialState.COMPLETE]
            doc["random_pairs"] = pairs
        _save(key, {**doc, "model": args.model, "nfe": nfe})
        c = doc["curves"][label]["curve"]
        print(f"{label}: best {c[-1]:.5g} after {len(c)} evaluations ({time.perf_counter() - t:.0f}s)", flush=True)


def cmd_predictors(args) -> None:
    nfe = args.nfe[0]
    doc = _load(f"search_efficiency_{args.model}_nfe{nfe}.json")
    pairs = doc.get("random_pairs")
    if not pairs:
        raise SystemExit("run `efficiency` first: its random search provides the held-out pairs")
    scheds = [schedule_from_json(s) for s, _ in pairs]
    values = [float(v) for _, v in pairs]
    half = len(pairs) // 2
    # The first seed's split is the headline figure; further seeds re-split the same pairs (and re-seed the
    # predictors) to show how much of it is the luck of one split.
    seeds = args.split_seeds or [args.seed]
    splits = {}
    for seed in seeds:
        idx = np.random.default_rng(seed).permutation(len(pairs))
        out = {}
        for name in predictors.names():
            t = time.perf_counter()
            p = predictors.get(name, seed=seed).fit([scheds[i] for i in idx[:half]], [values[i] for i in idx[:half]])
            q = p.evaluate([scheds[i] for i in idx[half:]], [values[i] for i in idx[half:]], k=20)
            out[name] = {**q.to_dict(), "n_train": half, "seconds": time.perf_counter() - t}
            print(f"split seed {seed} {name}: tau {q.kendall_tau:.3f}, top-20 recall {q.topk_recall:.2f} "
                  f"(train {half}, test {q.n}, {out[name]['seconds']:.1f} s)", flush=True)
        splits[str(seed)] = out
    _save(f"search_predictors_{args.model}_nfe{nfe}.json",
          {"model": args.model, "nfe": nfe, "feature_version": predictors.FeatureSpec().version,
           "results": splits[str(seeds[0])], "splits": splits})


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = args.nfe[0]
    doc = _load(f"search_efficiency_{args.model}_nfe{nfe}.json")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"s3": "C3", "tpe": "C0", "cmaes": "C2", "random": "C7"}
    labelled = set()
    for label, entry in doc.get("curves", {}).items():
        method = label.split("-seed")[0].split("+")[0]
        c = entry["curve"]
        seeded = label.endswith("+baselines")
        ax.plot(np.arange(1, len(c) + 1), c, color=colours.get(method, "k"),
                lw=1.6 if label in (method, method + "+baselines") else 0.9, ls="--" if seeded else "-",
                label=None if (method, seeded) in labelled else method + (" + baselines" if seeded else ""))
        labelled.add((method, seeded))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(0.1, 10)
    ax.set_xlabel("true evaluations")
    ax.set_ylabel("best so far (search split, lower is better)")
    ax.set_title(f"{args.model}, NFE {nfe}: best so far\n(thick: seed 0, thin: seeds 1-2, dashed: baselines first)",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = OUT / f"search_efficiency_{args.model}_nfe{nfe}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _report_seeds() -> None:
    """One table per family of quality runs that differ only in --seed (file names ending in -seed<S>)."""
    families: dict[str, dict[int, dict]] = {}
    for f in sorted(OUT.glob("search_quality_*-seed*.json")):
        stem, _, seed = f.stem.rpartition("-seed")
        if seed.isdigit():
            families.setdefault(stem, {})[int(seed)] = json.loads(f.read_text())
    for stem, by_seed in families.items():
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        nfes = sorted({int(n) for q in by_seed.values() for n in q.get("runs", {})})
        print(f"\n### {stem}: excess ratio by seed (test split; target 0.3 at NFE <= 6, 0.6 above)\n")
        print("| NFE | " + " | ".join(f"seed {s}" for s in seeds) + " | met |")
        print("|---|" + "---|" * len(seeds) + "---|")
        for nfe in nfes:
            cells, met, n = [], 0, 0
            for s in seeds:
                r = by_seed[s].get("runs", {}).get(str(nfe))
                if r is None:
                    cells.append("-")
                    continue
                _, base, ratio = _judged(r, by_seed[s]["reference"])
                n += 1
                met += ratio <= _target(nfe)
                cells.append(f"{ratio:.3f}" + ("" if r["test_value"] < base else " (lost)"))
            print(f"| {nfe} | " + " | ".join(cells) + f" | {met} of {n} |")


def cmd_report(args) -> None:
    for f in sorted(OUT.glob("search_quality_*.json")):
        q = json.loads(f.read_text())
        if q.get("runs"):
            print(f"\n### {f.stem}: searched vs best baseline (test split, {q['metric']}; 1000-step value "
                  f"{q['reference']:.5g})\n")
            print("| NFE | evaluations | searched | best baseline | its value | beats it | excess ratio | target "
                  "| met |")
            print("|---|---|---|---|---|---|---|---|---|")
            for nfe, r in sorted(q["runs"].items(), key=lambda kv: int(kv[0])):
                target = _target(int(nfe))
                # From the stored values, so a 1000-step value measured after the runs (--reference) applies.
                name, base, ratio = _judged(r, q["reference"])
                met = "yes" if ratio <= target else ("n/a" if math.isnan(ratio) else "no")
                beats = "yes" if r["test_value"] < base else "no"
                print(f"| {nfe} | {r['evaluations']} | {r['test_value']:.5g} | {name} | "
                      f"{base:.5g} | {beats} | {ratio:.3f} | <= {target} | {met} |")
    _report_seeds()
    for model in args.models:
        for f in sorted(OUT.glob(f"search_efficiency_{model}_nfe*.json")):
            e = json.loads(f.read_text())
            print(f"\n### {model} NFE {e['nfe']}: best-so-far (search split)\n")
            print("| method | evaluations | best@50 | best@100 | best@200 | final | final test |")
            print("|---|---|---|---|---|---|---|")
            for m, c in e["curves"].items():
                cur = c["curve"]
                at = [f"{cur[min(n, len(cur)) - 1]:.5g}" for n in (50, 100, 200)]
                print(f"| {m} | {len(cur)} | {' | '.join(at)} | {cur[-1]:.5g} | {c['test_value']:.5g} |")
        for f in sorted(OUT.glob(f"search_predictors_{model}_nfe*.json")):
            p = json.loads(f.read_text())
            print(f"\n### {model} NFE {p['nfe']}: predictor quality on held-out random schedules\n")
            print("| predictor | Kendall tau | top-20 recall | train | test | fit s |")
            print("|---|---|---|---|---|---|")
            for name, r in p["results"].items():
                print(f"| {name} | {r['kendall_tau']:.3f} | {r['topk_recall']:.2f} | {r['n_train']} | {r['n']} | "
                      f"{r['seconds']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["quality", "yardstick", "efficiency", "predictors", "plot", "report"])
    ap.add_argument("--model", default="gmm-64d")
    ap.add_argument("--models", nargs="*", default=["gmm-64d", "digits"])
    ap.add_argument("--nfe", default="4,5,6,8,10", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--random-budget", type=int, default=1000)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--predictor", default="lightgbm-rank")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--population", type=int, default=256)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seeds", default=None, type=lambda s: [int(x) for x in s.split(",") if x],
                    help="predictors: train/test split seeds (default: --seed); the first is the headline")
    ap.add_argument("--force", action="store_true", help="rerun what is already stored")
    ap.add_argument("--seeded", action="store_true", help="efficiency: every method starts with the baselines")
    ap.add_argument("--yardstick-from", default=None, metavar="JSON",
                    help="quality: reuse the all-grid baselines of this stored quality file where it matches")
    ap.add_argument("--tag", default="", help="quality: suffix of the result file (e.g. -b200)")
    ap.add_argument("--recompute-reference", action="store_true",
                    help="recompute cached metric reference statistics (stale after new weights)")
    ap.add_argument("--reference", type=float, default=None,
                    help="quality: a 1000-step value measured earlier at the same --n-test and --seed")
    ap.add_argument("--methods", nargs="*", default=None, help="efficiency: only these methods")
    ap.add_argument("--option", action="append", default=[], type=_option, metavar="KEY=JSON",
                    help="a search option (s3search.search.options.SearchOptions), e.g. init_random=10; repeatable")
    ap.add_argument("--redo", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="quality: rerun these NFE")
    args = ap.parse_args()
    args.option = dict(args.option)
    {"quality": cmd_quality, "yardstick": cmd_yardstick, "efficiency": cmd_efficiency, "predictors": cmd_predictors, "plot": cmd_plot,
     "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
