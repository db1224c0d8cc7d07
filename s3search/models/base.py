"""The model contract: what the evaluator needs to know about a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..denoisers import Denoiser

__all__ = ["ModelSpec"]


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

    @property
    def process(self):
        return self.denoiser.process
