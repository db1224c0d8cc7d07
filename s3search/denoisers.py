"""Denoisers: D(x, t) -> E[x0 | x_t], and adapters from the usual network parametrisations.

`sample` accepts any callable `D(x, t)` where t is the process's own time as a Python float (for EDM, sigma).
A `Denoiser` object additionally carries its process and, optionally, the data mean (for first_step="mean-x0").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from .processes import NoiseProcess, get

__all__ = ["DenoiserFn", "Denoiser", "from_x0", "from_eps", "from_v", "from_flow", "NetFn", "TimeMap"]

DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]
NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # net(x, time_input as a tensor of shape [batch])
TimeMap = Callable[[float], float]


@runtime_checkable
class DenoiserLike(Protocol):
    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor: ...


@dataclass
class Denoiser:
    """A data-prediction denoiser bound to the process its times refer to."""

    fn: DenoiserFn
    process: NoiseProcess
    data_mean: Optional[torch.Tensor] = None
    name: str = ""

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.fn(x, t)


def _time_tensor(x: torch.Tensor, t: float, time_map: Optional[TimeMap]) -> torch.Tensor:
    value = time_map(t) if time_map is not None else t
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


def _adapter(net: NetFn, process: str | NoiseProcess, time_map: Optional[TimeMap], to_x0, name: str,
             data_mean: Optional[torch.Tensor]) -> Denoiser:
    proc = get(process)
    if time_map is None and hasattr(proc, "model_time"):
        time_map = proc.model_time  # discrete-time networks take a step index

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        out = net(x, _time_tensor(x, t, time_map))
        return to_x0(x, out, proc.alpha(t), proc.sigma(t), t)

    return Denoiser(fn=fn, process=proc, data_mean=data_mean, name=name)


def from_x0(net: NetFn, process: str | NoiseProcess, time_map: Optional[TimeMap] = None,
            data_mean: Optional[torch.Tensor] = None) -> Denoiser:
    """A network that predicts x0 directly."""
    return _adapter(net, process, time_map, lambda x, out, a, s, t: out, "x0", data_mean)


def from_eps(net: NetFn, process: str | NoiseProcess, time_map: Optional[TimeMap] = None,
             data_mean: Optional[torch.Tensor] = None) -> Denoiser:
    """A network that predicts the noise eps: x0 = (x - sigma eps) / alpha."""
    return _adapter(net, process, time_map, lambda x, out, a, s, t: (x - s * out) / a, "eps", data_mean)


def from_v(net: NetFn, process: str | NoiseProcess, time_map: Optional[TimeMap] = None,
           data_mean: Optional[torch.Tensor] = None) -> Denoiser:
    """A v-prediction network (v = alpha eps - sigma x0, VP processes): x0 = alpha x - sigma v."""
    return _adapter(net, process, time_map, lambda x, out, a, s, t: a * x - s * out, "v", data_mean)


def from_flow(net: NetFn, process: str | NoiseProcess = "flow", time_map: Optional[TimeMap] = None,
              data_mean: Optional[torch.Tensor] = None) -> Denoiser:
    """A flow-matching network predicting u = eps - x0 on x_t = (1 - t) x0 + t eps: x0 = x - t u."""
    return _adapter(net, process, time_map, lambda x, out, a, s, t: x - s * out, "flow", data_mean)
