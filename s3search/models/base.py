"""The model contract: what the evaluator needs to know about a model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..denoisers import Denoiser

__all__ = ["Conditions", "ModelSpec", "ModelTraits", "single_threaded", "file_sha256"]


@dataclass(frozen=True)
class Conditions:
    """One batch of text conditioning for `ModelSpec.denoiser_for`; None fields take the model's defaults.

    The prompts apply to the rows of x in order, each to len(x) / len(prompts) consecutive rows (as a pipeline's
    num_images_per_prompt does), so one prompt conditions a batch of any size. The names and meanings are those
    of the pipelines' __call__ arguments: guidance_scale is the classifier-free guidance weight, except for FLUX
    where it is the distilled guidance the transformer embeds and true_cfg_scale (with negative prompts) is CFG.
    """

    prompts: tuple[str, ...]
    negative_prompts: Optional[tuple[str, ...]] = None   # one, or one per prompt
    guidance_scale: Optional[float] = None
    true_cfg_scale: Optional[float] = None

    def __post_init__(self) -> None:
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={self.prompts!r} must be a non-empty sequence of strings")
        object.__setattr__(self, "prompts", prompts)
        if self.negative_prompts is not None:
            negative = (self.negative_prompts,) if isinstance(self.negative_prompts, str) else \
                tuple(self.negative_prompts)
            if len(negative) not in (1, len(prompts)) or not all(isinstance(p, str) for p in negative):
                raise ValueError(f"negative_prompts must be one string or {len(prompts)} (one per prompt); "
                                 f"got {self.negative_prompts!r}")
            object.__setattr__(self, "negative_prompts", negative * (len(prompts) // len(negative)))
        for name in ("guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name}={value!r} must be a finite number")


@dataclass(frozen=True)
class ModelTraits:
    """What a metric may need from a model, known without sampling from it (see Metric.problem)."""

    exact: bool                    # an exact density (a GaussianMixture in ModelSpec.exact)
    features: Optional[str]        # None, "inception" (metrics.fid.InceptionFeatures) or "other" (digits, ...)
    reference: bool                # reference samples: a sampler, a finite data set or the exact target
    text_to_image: bool = False    # samples are latents of prompts (denoiser_for), decoded for image metrics
    image_reference: bool = False  # FID reference of the decoded images (ModelSpec.image_reference)
    clip: bool = False             # a CLIP model for the CLIP score (ModelSpec.clip)


@dataclass
class ModelSpec:
    name: str
    denoiser: Denoiser                       # D(x, t) with .process (and .data_mean when known)
    shape: tuple[int, ...]                   # one sample, e.g. (2,), (64,), (1, 8, 8)
    description: str = ""
    default_metric: str = "fd"
    # Samples of the target distribution (exact for mixtures, real data for image models), for reference stats.
    reference_sampler: Optional[Callable[[int, torch.Generator], torch.Tensor]] = None
    # The whole data set, where the target is a finite one (real images). Reference stats then use all of it,
    # whatever the sample count, seed or split asked for: resampling a finite set only adds noise that differs
    # between splits (a schedule's digits feature-FD moved by 2.8 between two draws of 2000 from 1797 images).
    reference_set: Optional[Callable[[], torch.Tensor]] = None
    # Feature network for Frechet distances in feature space (digits classifier, Inception), batch -> [B, F].
    features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    exact: Any = None                        # e.g. the GaussianMixture, for exact metrics (NLL, mode weights)
    provenance: dict[str, str] = field(default_factory=dict)  # weights hash, source path, ...
    # Text-conditioned models (kind diffusers-pipeline): `denoiser` is then the model at its default prompt, and
    # denoiser_for(conditions) the model for one batch of prompts, on the same process and shape.
    denoiser_for: Optional[Callable[[Conditions], Denoiser]] = None
    # Latent models: latents [B, *shape] -> images [B, 3, H, W] in [-1, 1] (the data_range image metrics expect).
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # The times, on this process, at which the model's own sampler evaluates it for n steps (a pipeline's
    # scheduler with its shift), for comparing a searched schedule with the shipped one.
    scheduler_times: Optional[Callable[[int], list[float]]] = None
    # Text-to-image models: the prompt sets a job may name (models.prompts.PromptSet by name) and the default.
    prompt_sets: dict[str, Any] = field(default_factory=dict)
    default_prompt_set: Optional[str] = None
    # Text-to-image models: the reference of `fid` on decoded images (metrics.reference_stats.InceptionReference:
    # precomputed Inception statistics or reference images), and the CLIP model of `clip-score`
    # (metrics.clip.CLIPScorer). Their files' hashes are in the provenance.
    image_reference: Any = None
    clip: Any = None

    @property
    def process(self):
        return self.denoiser.process

    @property
    def conditional(self) -> bool:
        return self.denoiser_for is not None

    @property
    def fingerprint(self) -> str:
        """sha256 of the provenance (weights and feature-network hashes, source), process and shape.

        Caches keyed by model name also carry this, so a different model registered under an old name is a
        miss. It is only as good as the provenance: a model without a weights hash (an entry point) keeps the
        same fingerprint when its weights change.
        """
        doc = {"provenance": {str(k): str(v) for k, v in self.provenance.items()},
               "process": self.process.name, "shape": list(self.shape)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    @property
    def traits(self) -> ModelTraits:
        from ..metrics.fid import InceptionFeatures  # here, not at the top: metrics imports this module

        if self.features is None:
            features = None
        elif isinstance(self.features, InceptionFeatures):
            features = "inception"
        else:
            features = "other"
        exact = hasattr(self.exact, "log_prob")
        reference = self.reference_sampler is not None or self.reference_set is not None or \
            hasattr(self.exact, "sample")
        return ModelTraits(exact=exact, features=features, reference=reference, text_to_image=self.conditional,
                           image_reference=self.image_reference is not None, clip=self.clip is not None)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one torch thread (and one numpy BLAS thread), restoring the counts afterwards.

    LAPACK and BLAS results (a batched eigh, an SVD, a large matmul) depend on how the work is split between
    threads, so parameters built under OMP_NUM_THREADS=1 and =2 differ in their last bits, and so does the
    model's fingerprint. Building under one thread gives the same bits under any setting.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _numpy_blas_single_thread():
            yield
    finally:
        torch.set_num_threads(previous)


def _numpy_blas_single_thread() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        # threadpoolctl comes with scikit-learn, not with the core install. Without it numpy's BLAS keeps its
        # threads; OpenBLAS runs products up to 64^3 (the largest the built-in mixtures form) on one thread.
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (weights files may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
