"""Metrics a search minimises, by name. Each knows what it needs and turns generated samples into one number.

    metric = metrics.get("fd")
    metric.check_model(spec)                                   # ValueError if the model lacks what it needs
    metric.problem(spec.traits, spec.name)                     # the same check as a message (None: fine)
    ref = metric.reference_stats(spec, lambda: spec.reference_sampler(n, g))   # cached by evaluation.reference
    value = metric.compute(samples, MetricContext(spec, ref))

Lower is better for every metric, so `clip-score` is minus the CLIP score and `prompt-accuracy` is 1 - the
digits classifier's mean probability of the prompted digit. `reference_stats` returns named float64
tensors (stored as safetensors). `metric.model_problem(spec)` adds to `problem` what only the files can tell (the
Inception weights file is there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..models.base import ModelSpec, ModelTraits
from . import clip, digits_prompts, frechet, mixture, mmd, reference_stats, sliced, trajectory

__all__ = ["Metric", "MetricContext", "names", "get", "UnknownMetricError", "batched_features"]

ReferenceDraw = Callable[[], torch.Tensor]
_F64 = torch.float64


@dataclass
class MetricContext:
    model: ModelSpec
    reference: dict[str, torch.Tensor] = field(default_factory=dict)   # from Metric.reference_stats
    trajectory_reference: Optional[torch.Tensor] = None                 # same rows as the samples
    prompts: Optional[tuple[str, ...]] = None                           # text-to-image: one prompt a row


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    version: str                           # bump when reference_stats changes: old caches are then refused
    needs_reference: bool = False          # reads reference stats (drawn from model.reference_sampler)
    needs_exact: bool = False              # needs model.exact (a GaussianMixture)
    needs_features: bool = False           # needs model.features
    needs_trajectory_reference: bool = False
    needs_inception: bool = False          # the features must be Inception's (metrics.fid.InceptionFeatures)
    needs_clip: bool = False               # needs model.clip (metrics.clip.CLIPScorer) and the rows' prompts
    needs_prompts: bool = False            # a text-to-image model and the rows' prompts (digits_prompts)
    _stats: Optional[Callable[[ModelSpec, ReferenceDraw], dict[str, torch.Tensor]]] = None
    _compute: Callable[[torch.Tensor, MetricContext], float] = lambda x, ctx: float("nan")

    def problem(self, traits: ModelTraits, model_name: str) -> Optional[str]:
        """Why this metric cannot be computed for a model with these traits, or None when it can."""
        who = f"model={model_name!r}"
        if self.needs_exact and not traits.exact:
            return f"metric={self.name!r} needs a model with an exact density (a Gaussian mixture); {who} has none"
        if self.needs_clip and not traits.clip:
            if not traits.text_to_image:
                return f"metric={self.name!r} scores images against their prompts; {who} is not a text-to-image model"
            return (f"metric={self.name!r} needs CLIP weights: set clip = \"/models/clip-vit-large-patch14\" (a "
                    f"transformers CLIPModel folder) in the registry entry of {who}")
        if self.needs_prompts and not traits.text_to_image:
            return (f"metric={self.name!r} reads each image as the digit its prompt names; {who} is not a "
                    "text-to-image model (digits-t2i and digits-t2i-flow are)")
        if traits.text_to_image and self.needs_reference:
            if not self.needs_features:
                return (f"metric={self.name!r} compares samples with reference samples in the model's own (latent) "
                        f"space, which text-to-image {who} has none of: use fid (registry field reference_stats), "
                        "clip-score (field clip) or trajectory")
            if not traits.image_reference:
                return (f"metric={self.name!r} on text-to-image {who} needs reference statistics: set "
                        "reference_stats = \"stats.npz\" (mu and sigma, as pytorch-fid and clean-fid write them) or "
                        "an array of reference images in its registry entry")
        if self.needs_features and traits.features is None:
            return f"metric={self.name!r} needs a feature network; {who} has none"
        if self.needs_inception and traits.features != "inception":
            return (f"metric={self.name!r} needs Inception features (registry entry features = \"inception\"); "
                    f"{who} has other features: use fd-features")
        if self.needs_reference and not (traits.reference or (self.needs_features and traits.image_reference)):
            return f"metric={self.name!r} needs reference samples; {who} has no reference_sampler"
        return None

    def model_problem(self, model: ModelSpec) -> Optional[str]:
        """`problem`, then the files: Inception features need their weights file, which is read only on first use,
        so a missing one would otherwise surface as an error on every evaluation."""
        problem = self.problem(model.traits, model.name)
        if problem is None and self.needs_prompts:
            return digits_prompts.model_problem(self.name, model)   # 8x8 images, prompts that name a digit
        if problem is not None or not (self.needs_features and model.traits.features == "inception"):
            return problem
        from .fid import resolve_weights_path

        try:
            resolve_weights_path(getattr(model.features, "weights_path", None))
        except FileNotFoundError as e:
            return f"metric={self.name!r} on model={model.name!r} needs its Inception weights file: {e}"
        return None

    def check_model(self, model: ModelSpec) -> None:
        problem = self.problem(model.traits, model.name)
        if problem is not None:
            raise ValueError(problem)

    def reference_stats(self, model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
        """What the metric keeps from the reference; `draw()` returns reference samples (called at most once)."""
        self.check_model(model)
        return {} if self._stats is None else self._stats(model, draw)

    def compute(self, samples: torch.Tensor, ctx: MetricContext) -> float:
        if self.needs_reference and not ctx.reference:
            raise ValueError(f"metric={self.name!r} needs reference stats")
        if self.needs_trajectory_reference and ctx.trajectory_reference is None:
            raise ValueError(f"metric={self.name!r} needs a trajectory reference from the same x_T")
        if (self.needs_clip or self.needs_prompts) and (ctx.prompts is None or len(ctx.prompts) != len(samples)):
            raise ValueError(f"metric={self.name!r} needs one prompt per sample ({len(samples)} samples, "
                             f"{'no' if ctx.prompts is None else len(ctx.prompts)} prompts)")
        return float(self._compute(samples, ctx))


class UnknownMetricError(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"metric={self.name!r} is unknown; known metrics: {', '.join(names())}"


# ----- the metrics ----------------------------------------------------------------------------------------
def batched_features(model: ModelSpec, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    if model.features is None:
        raise ValueError(f"model={model.name!r} has no feature network")
    with torch.no_grad():
        return torch.cat([model.features(x[i:i + batch]).reshape(len(x[i:i + batch]), -1).to(_F64)
                          for i in range(0, len(x), batch)])


def _gauss(x: torch.Tensor) -> dict[str, torch.Tensor]:
    m, c = frechet.gaussian_stats(x)
    return {"mean": torch.from_numpy(m), "cov": torch.from_numpy(c)}


def _fd_stats(model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
    # A mixture's moments are known exactly: no reference sampling noise in the figure.
    if hasattr(model.exact, "covariance"):
        return {"mean": model.exact.mean().clone(), "cov": model.exact.covariance(0.0)}
    return _gauss(draw())


def _fd(x: torch.Tensor, ctx: MetricContext) -> float:
    m, c = frechet.gaussian_stats(x)
    return frechet.frechet_distance(m, c, ctx.reference["mean"], ctx.reference["cov"])


def _fd_features(x: torch.Tensor, ctx: MetricContext) -> float:
    return frechet.frechet_distance_to_stats(batched_features(ctx.model, x), ctx.reference["mean"],
                                             ctx.reference["cov"])


def _feature_stats(model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
    """Feature mean and covariance of the reference: a text-to-image model's reference file (its statistics, or
    its images' features), else of the model's reference samples."""
    ref: Optional[reference_stats.InceptionReference] = model.image_reference
    if ref is None:
        return _gauss(batched_features(model, draw()))
    if ref.kind == "stats":
        return ref.stats()
    return _gauss(torch.cat([batched_features(model, images) for images in ref.image_batches()]))


def _minus_clip_score(x: torch.Tensor, ctx: MetricContext) -> float:
    return -ctx.model.clip.score(x, ctx.prompts)


def _samples_stats(model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
    ref = draw().reshape(-1, *model.shape).to(_F64)
    return {"samples": ref}


def _mmd_stats(model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
    ref = draw().reshape(-1, *model.shape).to(_F64)
    return {"samples": ref, "length_scale": torch.tensor(mmd.median_distance(ref), dtype=_F64)}


def _outlier_stats(model: ModelSpec, draw: ReferenceDraw) -> dict[str, torch.Tensor]:
    return {"threshold": torch.tensor(mixture.outlier_threshold(draw(), model.exact), dtype=_F64)}


_METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("fd", "Fréchet distance in data space (exact target moments for mixtures)", "1", needs_reference=True,
           _stats=_fd_stats, _compute=_fd),
    Metric("fd-features", "Fréchet distance in the model's feature space (FID for image models)", "1",
           needs_reference=True, needs_features=True, _stats=_feature_stats, _compute=_fd_features),
    Metric("fid", "FID: Fréchet distance in Inception pool features (local weights file)", "1",
           needs_reference=True, needs_features=True, needs_inception=True, _stats=_feature_stats,
           _compute=_fd_features),
    Metric("clip-score", "minus the CLIP score, max(100 mean cos(image, prompt), 0) as torchmetrics' CLIPScore, "
           "of each decoded image with its row's prompt (local CLIP weights)", "1", needs_clip=True,
           _compute=_minus_clip_score),
    Metric("prompt-accuracy", "1 - the digits classifier's mean probability of the digit each row's prompt names "
           "(digits text-to-image models)", "1", needs_prompts=True,
           _compute=lambda x, ctx: digits_prompts.prompt_accuracy_error(x, ctx.prompts)),
    Metric("fd-per-digit", "class-balanced feature FD: per prompted digit, FD in the digits classifier's features "
           "to that digit's real images, averaged over digits (digits text-to-image models)", "1",
           needs_prompts=True, _compute=lambda x, ctx: digits_prompts.fd_per_digit(x, ctx.prompts)),
    Metric("sw2", "sliced Wasserstein-2 distance, 512 fixed projections", "1", needs_reference=True,
           _stats=_samples_stats,
           _compute=lambda x, ctx: sliced.sliced_wasserstein2(x, ctx.reference["samples"])),
    Metric("mmd", "unbiased MMD^2, RBF kernels at 1/2, 1, 2 x the reference median distance", "1",
           needs_reference=True, _stats=_mmd_stats,
           _compute=lambda x, ctx: mmd.mmd2_unbiased(x, ctx.reference["samples"],
                                                     float(ctx.reference["length_scale"]), (0.5, 1.0, 2.0))),
    Metric("nll", "negative log-likelihood under the true mixture", "1", needs_exact=True,
           _compute=lambda x, ctx: mixture.nll(x, ctx.model.exact)),
    Metric("mode-tv", "TV distance between sampled mode frequencies and the mixture weights", "1",
           needs_exact=True, _compute=lambda x, ctx: mixture.mode_weight_tv(x, ctx.model.exact)),
    Metric("outlier-rate", "fraction of samples below the 0.1% log-density quantile of true samples", "1",
           needs_reference=True, needs_exact=True, _stats=_outlier_stats,
           _compute=lambda x, ctx: mixture.outlier_rate(x, ctx.model.exact, float(ctx.reference["threshold"]))),
    Metric("trajectory", "RMS per-coordinate error to a reference solution from the same x_T", "1",
           needs_trajectory_reference=True,
           _compute=lambda x, ctx: trajectory.trajectory_error(x, ctx.trajectory_reference)),
]}


def names() -> list[str]:
    return sorted(_METRICS)


def get(name: str) -> Metric:
    if name not in _METRICS:
        raise UnknownMetricError(name)
    return _METRICS[name]
