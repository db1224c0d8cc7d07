"""Per-sample error to a reference solution started from the same x_T (ODE samplers' global error).

The value is the mean over samples of the RMS error per coordinate, ||x_hat - x_ref|| / sqrt(d), so figures are
comparable across dimensions; its log-log slope against NFE is the empirical order.
"""

from __future__ import annotations

import torch

__all__ = ["trajectory_error", "per_sample_error"]


def per_sample_error(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if samples.shape != reference.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape")
    diff = (samples.to(torch.float64) - reference.to(torch.float64)).reshape(len(samples), -1)
    return diff.pow(2).mean(1).sqrt()


def trajectory_error(samples: torch.Tensor, reference: torch.Tensor) -> float:
    return float(per_sample_error(samples, reference).mean())
