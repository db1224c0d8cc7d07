"""Exact metrics against a known Gaussian mixture p* (docs/math.md §8, §9): NLL, mode-weight TV error, outlier rate.

Low NLL also rewards collapsing onto the heaviest modes, so it is reported next to the mode-weight error.
`sigma_end` is the VE noise level the samples are meant to have (0 for finished samples).
"""

from __future__ import annotations

import torch

from ..models.mixtures import GaussianMixture

__all__ = ["nll", "mode_weight_tv", "outlier_threshold", "outlier_rate", "entropy_mc"]


def nll(samples: torch.Tensor, gm: GaussianMixture, sigma_end: float = 0.0) -> float:
    """-mean_i log p*(x_i), the figure Align Your Steps reports for its 2-D toys."""
    return float(-gm.log_prob(samples, sigma_end).mean())


def mode_weight_tv(samples: torch.Tensor, gm: GaussianMixture, sigma_end: float = 0.0) -> float:
    """TV distance between the frequencies of each sample's most responsible component and the weights."""
    comp = gm.responsibilities(samples, sigma_end).argmax(1)
    freq = torch.bincount(comp, minlength=gm.n_components).double() / len(comp)
    return float(0.5 * (freq - gm.weights).abs().sum())


def outlier_threshold(reference: torch.Tensor, gm: GaussianMixture, sigma_end: float = 0.0,
                      quantile: float = 1e-3) -> float:
    """The `quantile` of log p* over true samples: below it, a sample counts as an outlier."""
    return float(torch.quantile(gm.log_prob(reference, sigma_end), quantile))


def outlier_rate(samples: torch.Tensor, gm: GaussianMixture, threshold: float, sigma_end: float = 0.0) -> float:
    return float((gm.log_prob(samples, sigma_end) < threshold).double().mean())


def entropy_mc(gm: GaussianMixture, n: int, generator: torch.Generator, sigma_end: float = 0.0) -> float:
    """Monte-Carlo estimate of H(p*) = E[-log p*]: the value a perfect sampler's NLL scatters around."""
    return float(-gm.log_prob(gm.sample(n, generator, sigma_end, dtype=torch.float64), sigma_end).mean())
