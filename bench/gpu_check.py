"""GPU check: one search-split evaluation of a text-to-image pipeline, in this process and under Ray, timed.

Prints, for each place it ran, the wall time of the evaluation and the time spent inside the model's network
calls (CUDA-synchronised), so the share of an evaluation that is the model (what a GPU should be busy with)
is measured rather than guessed. With no --registry it builds a tiny random Stable Diffusion pipeline
(s3search.models.tiny_pipelines) with a three-prompt set, so it also runs on a CPU as a smoke test:

    python bench/gpu_check.py                                    # tiny pipeline, device auto (cuda if present)
    python bench/gpu_check.py --registry models.toml --model sd15 --n 256 --nfe 8 --metric trajectory
    python bench/gpu_check.py --no-ray --json out.json

Under Ray the evaluation runs in an actor with S3SEARCH_RAY_GPUS_PER_EVAL GPUs (1 when CUDA is present here,
unless set); the worker reports its own evaluation time, and the difference to the driver's wall time is what
Ray adds (start-up excluded: the actor is warmed up with one evaluation first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from s3search import baselines  # noqa: E402
from s3search.denoisers import Denoiser  # noqa: E402
from s3search.evaluation.base import EvalRequest  # noqa: E402
from s3search.evaluation.local import LocalEvaluator  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.models.base import ModelSpec  # noqa: E402


def tiny_registry(folder: Path, device: str) -> Path:
    """A registry file with a tiny random SD pipeline and a prompt set, written under `folder`."""
    from s3search.models.tiny_pipelines import tiny_pipeline

    tiny_pipeline("sd", folder / "parts").save_pretrained(folder / "pipe", safe_serialization=True)
    (folder / "prompts.txt").write_text("a handwritten 7\nthe digit three\na bold 1\n")
    path = folder / "models.toml"
    path.write_text(textwrap.dedent(f"""
        [models.tiny-sd]
        kind = "diffusers-pipeline"
        path = "pipe"
        height = 16
        width = 16
        device = "{device}"
        prompts = "prompts.txt"
    """))
    return path


class ModelClock:
    """Time spent inside the model's calls; CUDA work is waited for, so the clock holds the GPU's time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        def timed(x: torch.Tensor, t: float) -> torch.Tensor:
            _sync()
            start = time.perf_counter()
            out = denoiser(x, t)
            _sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        return dataclasses.replace(denoiser, fn=timed)

    def spec(self, spec: ModelSpec) -> ModelSpec:
        inner: Callable[..., Denoiser] | None = spec.denoiser_for
        if inner is None:
            return dataclasses.replace(spec, denoiser=self.wrap(spec.denoiser))
        return dataclasses.replace(spec, denoiser_for=lambda conditions: self.wrap(inner(conditions)))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def local_run(spec: ModelSpec, schedule: Any, request: EvalRequest, batch_size: int) -> dict[str, Any]:
    clock = ModelClock()
    evaluator = LocalEvaluator(batch_size=batch_size, models={spec.name: clock.spec(spec)}, trajectory_steps=16)
    evaluator.evaluate([schedule], dataclasses.replace(request, split="validation"))   # warm-up: encode, caches
    clock.seconds, clock.calls = 0.0, 0
    start = time.perf_counter()
    (result,) = evaluator.evaluate([schedule], request)
    wall = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"the local evaluation failed: {result.error}")
    return {"where": "local", "wall_s": wall, "model_s": clock.seconds, "model_calls": clock.calls,
            "value": result.value}


def ray_run(schedule: Any, request: EvalRequest, batch_size: int) -> dict[str, Any]:
    from s3search.distributed import RayEvaluator

    if torch.cuda.is_available():
        os.environ.setdefault("S3SEARCH_RAY_GPUS_PER_EVAL", "1")
    evaluator = RayEvaluator(factory_kwargs={"batch_size": batch_size, "trajectory_steps": 16})
    try:
        evaluator.evaluate([schedule], dataclasses.replace(request, split="validation"))   # actor start-up
        start = time.perf_counter()
        (result,) = evaluator.evaluate([schedule], request)
        wall = time.perf_counter() - start
    finally:
        evaluator.close()
    if not result.ok:
        raise SystemExit(f"the Ray evaluation failed: {result.error}")
    return {"where": "ray", "wall_s": wall, "worker_eval_s": result.seconds, "value": result.value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, help="a model registry file (default: a tiny random SD pipeline)")
    ap.add_argument("--model", default="tiny-sd", help="the registry entry to evaluate")
    ap.add_argument("--device", default="auto", help="device of the tiny pipeline: auto | cpu | cuda")
    ap.add_argument("--metric", default="trajectory")
    ap.add_argument("--n", type=int, default=8, help="samples in the evaluation")
    ap.add_argument("--nfe", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per sampling call")
    ap.add_argument("--no-ray", action="store_true", help="only the local evaluation")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.registry or tiny_registry(Path(tmp), args.device)
        os.environ["S3SEARCH_MODEL_REGISTRY"] = str(path)   # Ray workers started below inherit it
        registry.clear_cache()
        spec = registry.get(args.model)
        times = spec.scheduler_times(args.nfe) if spec.scheduler_times else None
        schedule = baselines.get("dpmpp_2m", timesteps=times, process=spec.process.name) if times else None
        if schedule is None:
            raise SystemExit(f"model {args.model!r} has no scheduler_times: give a pipeline entry")
        request = EvalRequest(args.model, args.metric, args.n, seed=0, split="search")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"model {args.model} ({spec.description}) on {device}; {args.n} samples, NFE {schedule.nfe}, "
              f"metric {args.metric}", file=sys.stderr)
        rows = [local_run(spec, schedule, request, args.batch_size)]
        if not args.no_ray:
            rows.append(ray_run(schedule, request, args.batch_size))
    print(f"{'where':<8}{'wall s':>10}{'model s':>10}{'model share':>13}{'worker s':>10}{'value':>14}")
    for r in rows:
        share = r["model_s"] / r["wall_s"] if "model_s" in r and r["wall_s"] > 0 else float("nan")
        print(f"{r['where']:<8}{r['wall_s']:>10.3f}{r.get('model_s', float('nan')):>10.3f}{share:>13.2f}"
              f"{r.get('worker_eval_s', float('nan')):>10.3f}{r['value']:>14.6g}")
    if len(rows) == 2 and rows[0]["value"] != rows[1]["value"]:
        print("note: the Ray value differs from the local one", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
