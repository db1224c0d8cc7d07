"""A network kind (diffusers-unet, torchscript) as a denoiser: its adapter, time input and class guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ... import denoisers, processes
from ...denoisers import Denoiser
from ..guidance import conditional_net, guided_net
from .noise import time_map
from .registry_file import LocalModelEntry

__all__ = ["NetworkParts", "network_denoiser"]

_ADAPTERS = {"eps": denoisers.from_eps, "v": denoisers.from_v, "x0": denoisers.from_x0,
             "flow": denoisers.from_flow}


@dataclass(frozen=True)
class NetworkParts:
    """What a loader reads from a network file: net(x, time_input[, class_labels]) and how to interpret it."""

    net: Callable[..., torch.Tensor]
    process: processes.NoiseProcess
    prediction_type: str                        # eps | v | x0 | flow
    shape: tuple[int, ...]
    conditional: bool                           # the network takes class labels


def network_denoiser(entry: LocalModelEntry, parts: NetworkParts) -> tuple[Denoiser, tuple[int, ...]]:
    net = parts.net
    if entry.class_label is not None and not parts.conditional:
        raise ValueError(entry.err("class_label", "the network is not class-conditional"))
    if entry.class_label is None:
        net_fn = lambda x, t_in: net(x, t_in)  # noqa: E731
    elif entry.guidance_scale is None or entry.guidance_scale == 1.0:
        net_fn = conditional_net(net, entry.class_label)
    else:
        net_fn = guided_net(net, entry.class_label, entry.null_label, entry.guidance_scale)
    proc = parts.process
    denoiser = _ADAPTERS[parts.prediction_type](net_fn, proc, time_map=time_map(entry, proc))
    denoiser.name = entry.name
    return denoiser, tuple(parts.shape)
