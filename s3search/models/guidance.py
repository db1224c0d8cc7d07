"""Classifier-free guidance: the guided denoiser is what the sampler sees.

    D_guided(x, t) = D_u(x, t) + w (D_c(x, t) - D_u(x, t))        (w = 1: conditional, w = 0: unconditional)

For a fixed (x, t) every adapter in `s3search.denoisers` is affine in the network output, so guiding the raw
eps / v / x0 outputs with the same w gives the same D_guided; `guided_net` does that with one batched network call
(conditional and unconditional rows together), `cfg` combines two denoisers.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..denoisers import Denoiser, DenoiserFn, NetFn
from ..processes import NoiseProcess

__all__ = ["ConditionalNetFn", "check_guidance", "cfg", "guided_net", "conditional_net"]

# net(x, time_input [B], class_labels [B] int64) -> output shaped like x
ConditionalNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_guidance(scale: float, field: str = "guidance_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{field}={scale!r} must be a finite number")
    return float(scale)


def _check_label(label: int, field: str) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"{field}={label!r} must be a non-negative integer")
    return label


def cfg(cond: Denoiser | DenoiserFn, uncond: Denoiser | DenoiserFn, scale: float,
        process: Optional[NoiseProcess] = None, name: str = "") -> Denoiser:
    """D_u + w (D_c - D_u); the process and data mean are taken from `cond` when it is a Denoiser."""
    w = check_guidance(scale)
    proc = process if process is not None else getattr(cond, "process", None)
    if proc is None:
        raise ValueError("process must be given when cond is a plain function")
    if isinstance(uncond, Denoiser) and uncond.process != proc:
        raise ValueError(f"process mismatch: conditional on {proc.name}, unconditional on {uncond.process.name}")

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        d_u = uncond(x, t)
        return d_u + w * (cond(x, t) - d_u)

    return Denoiser(fn=fn, process=proc, data_mean=getattr(cond, "data_mean", None),
                    name=name or f"cfg(w={w:g})")


def conditional_net(net: ConditionalNetFn, label: int) -> NetFn:
    """The network with its class label fixed (no guidance)."""
    label = _check_label(label, "class_label")

    def fn(x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        return net(x, t_in, torch.full((x.shape[0],), label, dtype=torch.long, device=x.device))

    return fn


def guided_net(net: ConditionalNetFn, label: int, null_label: int, scale: float) -> NetFn:
    """out_u + w (out_c - out_u) from one network call on the doubled batch [x; x] with labels [c; null]."""
    label, null_label = _check_label(label, "class_label"), _check_label(null_label, "null_label")
    w = check_guidance(scale)
    if w == 1.0:
        return conditional_net(net, label)  # the unconditional half would be multiplied by zero

    def fn(x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        labels = torch.cat([torch.full((b,), label, dtype=torch.long, device=x.device),
                            torch.full((b,), null_label, dtype=torch.long, device=x.device)])
        out = net(torch.cat([x, x]), torch.cat([t_in, t_in]), labels)
        out_c, out_u = out[:b], out[b:]
        return out_u + w * (out_c - out_u)

    return fn
