"""LocalEvaluator: score schedules in this process (also what each Ray actor runs).

For every schedule: sample i starts from x_T drawn by its own generator seeded with seeds.sample_seed(seed,
split, i), and the same generator then feeds the schedule's stochastic steps, so a sample does not depend on
the batch it lands in. Choice of x_T (documented in docs/models-metrics.md): by default N(0, sigma(t_0)^2 I) in
the process's own units at the schedule's first time t_0, the prior every user samples from; prior="exact" draws
the exact noised marginal p_{t_0} instead (mixtures only), which removes the prior mismatch from the figure.

The constructor takes only JSON-able arguments so a Ray actor can build one from its factory kwargs.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .. import metrics, processes
from ..models import registry
from ..models.base import ModelSpec
from ..models.prompts import conditions_for
from ..noise import generators_for, randn_rows
from .base import EvalRequest, EvalResult
from .reference import load_or_compute
from .seeds import EVAL_SPLITS, sample_seeds
from .teacher import TeacherPath, record_path, teacher_at

log = logging.getLogger("s3search.evaluation")

__all__ = ["LocalEvaluator", "schedule_hash", "teacher_checkpoints"]

PRIORS = ("gaussian", "exact")
# Image metrics of text-to-image models and their EvalResult.extras keys; clip_score is the CLIP score as
# published (higher is better), minus the clip-score metric.
IMAGE_EXTRAS = {"fid": "fid", "clip-score": "clip_score"}


def schedule_hash(schedule: Any) -> str:
    try:
        return schedule.canonical_hash()
    except Exception:  # an object that is not a valid schedule still needs a key for its error result
        return f"invalid-{id(schedule):x}"


# The teacher's checkpoints live in host memory for the whole study: at most this many bytes of them per
# (start, noise) set, fewer checkpoints for large latents (each end then costs more model calls).
TEACHER_CHECKPOINT_BYTES = 1 << 30


def teacher_checkpoints(row_bytes: int, n_rows: int, wanted: int) -> int:
    """How many checkpoints of `row_bytes` per row fit TEACHER_CHECKPOINT_BYTES for n_rows (at least 2)."""
    return max(2, min(wanted, TEACHER_CHECKPOINT_BYTES // max(1, row_bytes * n_rows)))


class LocalEvaluator:
    """Implements evaluation.base.Evaluator; results are memoised by (schedule, model, metric, n, seed, split)."""

    def __init__(self, batch_size: int = 1024, cache_dir: Optional[str] = None, reference_n: Optional[int] = None,
                 recompute_reference: bool = False, prior: str = "gaussian", device: str = "cpu",
                 extras: bool = True, trajectory_steps: int = 200, trajectory_checkpoints: int = 20,
                 models: Optional[Mapping[str, ModelSpec]] = None,
                 sampler: Optional[Callable[..., torch.Tensor]] = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if prior not in PRIORS:
            raise ValueError(f"prior={prior!r} must be one of {', '.join(PRIORS)}")
        if reference_n is not None and (not isinstance(reference_n, int) or reference_n < 2):
            raise ValueError(f"reference_n={reference_n!r} must be an integer >= 2")
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.reference_n = reference_n
        self.recompute_reference = recompute_reference
        self.prior = prior
        self.device = torch.device(device)
        self.extras = extras
        self.trajectory_steps = trajectory_steps
        self.trajectory_checkpoints = trajectory_checkpoints
        self._models = dict(models or {})
        self._sampler = sampler
        self._results: dict[tuple, EvalResult] = {}
        self._references: dict[tuple, dict[str, torch.Tensor]] = {}
        self._trajectories: dict[tuple, torch.Tensor] = {}
        self._paths: dict[tuple, list[TeacherPath]] = {}

    # ----- pieces -------------------------------------------------------------------------------------------
    def _model(self, name: str) -> ModelSpec:
        return self._models[name] if name in self._models else registry.get(name)

    def _sample_fn(self) -> Callable[..., torch.Tensor]:
        if self._sampler is None:
            from ..integrator import sample

            self._sampler = sample
        return self._sampler

    def _reference(self, model: ModelSpec, metric: metrics.Metric, request: EvalRequest) -> dict[str, torch.Tensor]:
        n = self.reference_n or request.n_samples
        key = (model.name, metric.name, n, request.seed, request.split)
        if key not in self._references:
            self._references[key] = load_or_compute(model, metric, n, request.seed, request.split,
                                                    root=self.cache_dir, recompute=self.recompute_reference)
        return self._references[key]

    def _x_T(self, model: ModelSpec, process: processes.NoiseProcess, t0: float,
             gens: list[torch.Generator]) -> torch.Tensor:
        dtype = model.denoiser.data_mean.dtype if model.denoiser.data_mean is not None else torch.float32
        if self.prior == "exact":
            if not hasattr(model.exact, "sample_rows"):
                raise ValueError(f"prior='exact' needs a model with an exact target; model={model.name!r} has none")
            a = process.alpha(t0)
            return (a * model.exact.sample_rows(gens, process.sigma(t0) / a, dtype=torch.float64)).to(dtype)
        like = torch.empty((len(gens), *model.shape), dtype=dtype)
        return process.sigma(t0) * randn_rows(like, gens)

    def _batches(self, model: ModelSpec, request: EvalRequest
                 ) -> list[tuple[int, list[int], Any, Optional[tuple[str, ...]]]]:
        """(first row, seeds, denoiser, each row's prompt or None) per batch. A text-to-image model gets each
        batch's own prompts by the rule of models.prompts, so a row meets the same prompt whatever batch or worker
        it lands in."""
        seeds = sample_seeds(request.seed, request.split, request.n_samples)
        prompt_set = self._prompt_set(model, request)
        out = []
        for i in range(0, len(seeds), self.batch_size):
            rows = seeds[i:i + self.batch_size]
            denoiser, prompts = model.denoiser, None
            if prompt_set is not None:
                conditions = conditions_for(prompt_set, request.seed, request.split, i, len(rows),
                                            request.guidance_scale)
                denoiser = model.denoiser_for(conditions)
                per_prompt = len(rows) // len(conditions.prompts)
                prompts = tuple(p for p in conditions.prompts for _ in range(per_prompt))
            out.append((i, rows, denoiser, prompts))
        return out

    @staticmethod
    def _prompt_set(model: ModelSpec, request: EvalRequest) -> Any:
        if not model.conditional:
            if request.prompt_set is not None or request.guidance_scale is not None:
                raise ValueError(f"model={model.name!r} is not text-conditioned: it takes no prompt set or "
                                 "guidance scale")
            return None
        name = request.prompt_set or model.default_prompt_set
        if name is None:
            raise ValueError(f"model={model.name!r} has no prompt set: name one in its registry entry "
                             "(prompts = \"captions.txt\")")
        if name not in model.prompt_sets:
            raise ValueError(f"prompt_set={name!r} is not a prompt set of model={model.name!r} "
                             f"(known: {', '.join(model.prompt_sets)})")
        return model.prompt_sets[name]

    def _generate(self, model: ModelSpec, schedule: Any, request: EvalRequest,
                  keep_x_T: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple[str, ...]]]:
        """Samples, their x_T (when kept) and the rows' prompts (text-to-image models), in row order."""
        process = processes.get(schedule.process)
        outs, starts, prompts = [], [], []
        sample = self._sample_fn()
        for _, rows, denoiser, batch_prompts in self._batches(model, request):
            prompts.extend(batch_prompts or ())
            gens = generators_for(rows)
            x_T = self._x_T(model, process, schedule.timesteps[0], gens)
            if keep_x_T:
                starts.append(x_T.clone())
            outs.append(sample(denoiser, x_T.to(self.device), schedule, gens).detach().cpu())
        return torch.cat(outs), (torch.cat(starts) if keep_x_T else None), (tuple(prompts) or None)

    def _trajectory_reference(self, model: ModelSpec, schedule: Any, request: EvalRequest,
                              x_T: torch.Tensor) -> torch.Tensor:
        t0, t_end = schedule.timesteps[0], schedule.timesteps[-1]
        # One recorded path per (x_T set, start); one reference per path, end and final rule.
        path_key = (model.name, schedule.process, request.n_samples, request.seed, request.split, self.prior,
                    float(t0), request.prompt_set, request.guidance_scale)
        key = path_key + (float(t_end), schedule.final)
        if key not in self._trajectories:
            process = processes.get(schedule.process)
            if hasattr(model.exact, "exact_pf_ode"):
                ref = model.exact.exact_pf_ode(x_T.to(torch.float64), process, t0, t_end)
                if schedule.final == "denoise":
                    ref = model.exact.denoise(ref, process, t_end)
            else:
                # The teacher is the same model, conditions and x_T on a fine grid: one (prompt, noise) pair,
                # one fine run per start, reused by every end and every schedule of the study (teacher.py).
                batches = self._batches(model, request)
                paths = self._teacher_paths(path_key, process, t0, t_end, x_T, batches)
                ref = torch.cat([teacher_at(denoiser, path, t_end, schedule.final, self.device)
                                 for (_, _, denoiser, _), path in zip(batches, paths)])
            self._trajectories[key] = ref.to(x_T.dtype)
        return self._trajectories[key]

    def _teacher_paths(self, key: tuple, process: processes.NoiseProcess, t0: float, t_end: float,
                       x_T: torch.Tensor, batches: list) -> list[TeacherPath]:
        """The recorded fine runs from t0, one per batch, down to the process's t_min (or below, to t_end)."""
        known = self._paths.get(key)
        if known is None or known[0].times[-1] > t_end:
            floor = min(process.t_min, t_end)
            count = teacher_checkpoints(x_T[0].numel() * x_T.element_size(), len(x_T), self.trajectory_checkpoints)
            known = [record_path(denoiser, x_T[i:i + len(rows)].to(self.device), process.name, t0, floor,
                                 self.trajectory_steps, count)
                     for i, rows, denoiser, _ in batches]
            self._paths[key] = known
        return known

    @staticmethod
    def _for_metric(model: ModelSpec, metric: metrics.Metric, samples: torch.Tensor) -> torch.Tensor:
        """Latent models: images from the model's decoder for image metrics; `trajectory` compares the latents
        themselves (the data-free objective, with no decode to pay)."""
        if model.decode is None or metric.needs_trajectory_reference:
            return samples
        return torch.cat([model.decode(samples[i:i + model_decode_batch(model)])
                          for i in range(0, len(samples), model_decode_batch(model))])

    def _extras(self, model: ModelSpec, samples: torch.Tensor) -> dict[str, float]:
        if not self.extras or not hasattr(model.exact, "log_prob"):
            return {}
        return {"nll": metrics.mixture.nll(samples, model.exact),
                "mode_tv": metrics.mixture.mode_weight_tv(samples, model.exact)}

    def _image_extras(self, model: ModelSpec, metric: metrics.Metric, value: float, images: torch.Tensor,
                      request: EvalRequest, prompts: Optional[tuple[str, ...]]) -> dict[str, float]:
        """A text-to-image evaluation by fid or clip-score records every one of the two the model can compute, on
        the same images, so a report shows FID and CLIP score side by side; `trajectory` skips the decode and adds
        none."""
        if not self.extras or not model.conditional or metric.name not in IMAGE_EXTRAS:
            return {}
        out = {}
        for name, key in IMAGE_EXTRAS.items():
            other = metrics.get(name)
            if name == metric.name:
                figure = value
            elif other.model_problem(model) is None:
                reference = self._reference(model, other, request) if other.needs_reference else {}
                figure = other.compute(images, metrics.MetricContext(model, reference, None, prompts))
            else:
                continue
            out[key] = -figure if name == "clip-score" else figure
        return out

    # ----- the contract -------------------------------------------------------------------------------------
    def _one(self, schedule: Any, request: EvalRequest, model: ModelSpec, metric: metrics.Metric) -> EvalResult:
        h = schedule_hash(schedule)
        start = time.perf_counter()
        nfe = -1
        try:
            nfe = int(schedule.nfe)
            if schedule.process != model.process.name:
                raise ValueError(f"process={schedule.process!r} does not match the model's process "
                                 f"{model.process.name!r}")
            reference = self._reference(model, metric, request) if metric.needs_reference else {}
            samples, x_T, prompts = self._generate(model, schedule, request, metric.needs_trajectory_reference)
            bad = int((~torch.isfinite(samples.reshape(len(samples), -1))).any(1).sum())
            if bad:
                raise FloatingPointError(f"{bad} of {len(samples)} samples are NaN or infinite")
            traj = self._trajectory_reference(model, schedule, request, x_T) if x_T is not None else None
            data = self._for_metric(model, metric, samples)
            value = metric.compute(data, metrics.MetricContext(model, reference, traj, prompts))
            if not math.isfinite(value):
                raise FloatingPointError(f"metric {metric.name} is {value}")
            extras = {**self._extras(model, samples),
                      **self._image_extras(model, metric, value, data, request, prompts)}
            return EvalResult(h, value, nfe, time.perf_counter() - start, None, extras)
        except Exception as e:  # a failed candidate is a result, never the end of a search
            return EvalResult(h, math.inf, nfe, time.perf_counter() - start, f"{type(e).__name__}: {e}")

    def _one_within_memory(self, schedule: Any, request: EvalRequest, model: ModelSpec,
                           metric: metrics.Metric) -> EvalResult:
        """`_one`, retried with half the batch after a CUDA out-of-memory error, down to one row a batch. The
        smaller batch is kept for later evaluations; results do not depend on it (one generator per row)."""
        result = self._one(schedule, request, model, metric)
        while _out_of_memory(result) and self.batch_size > 1:
            self.batch_size //= 2
            log.warning("out of memory on %s: retrying with batch_size=%d", model.name, self.batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            result = self._one(schedule, request, model, metric)
        return result

    def evaluate(self, schedules: Sequence[Any], request: EvalRequest) -> list[EvalResult]:
        try:
            if isinstance(request.n_samples, bool) or not isinstance(request.n_samples, int) or request.n_samples < 2:
                raise ValueError(f"n_samples={request.n_samples!r} must be an integer >= 2")
            if request.split not in EVAL_SPLITS:
                raise ValueError(f"split={request.split!r} must be one of {', '.join(EVAL_SPLITS)}")
            model = self._model(request.model)
            metric = metrics.get(request.metric)
            metric.check_model(model)
        except (KeyError, ValueError) as e:
            message = f"{type(e).__name__}: {e}"
            return [EvalResult(schedule_hash(s), math.inf, _safe_nfe(s), 0.0, message) for s in schedules]
        out = []
        for schedule in schedules:
            key = (schedule_hash(schedule), request.model, request.metric, request.n_samples, request.seed,
                   request.split, request.prompt_set, request.guidance_scale, self.prior, self.reference_n)
            result = self._results.get(key) or self._one_within_memory(schedule, request, model, metric)
            if result.ok:  # errors may be transient (memory, a dying worker): they are not memoised
                self._results[key] = result
            out.append(result)
        return out


def _out_of_memory(result: EvalResult) -> bool:
    return not result.ok and str(result.error).startswith(("OutOfMemoryError", "torch.OutOfMemoryError"))


def model_decode_batch(model: ModelSpec) -> int:
    """Rows per decoder call: the model's own evaluation batch size where it declares one."""
    return int(getattr(model, "batch_size", None) or 64)


def _safe_nfe(schedule: Any) -> int:
    try:
        return int(schedule.nfe)
    except Exception:
        return -1
