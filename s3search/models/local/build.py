"""One registry entry -> its ModelSpec: the kind's denoiser on a registered process, reference data, features."""

from __future__ import annotations

from typing import Optional

import torch

from ..base import ModelSpec
from . import diffusers_pipeline, diffusers_unet, torchscript
from .common import features_hashes, features_of, load_reference
from .entrypoint import entrypoint_denoiser
from .network import network_denoiser
from .noise import registered
from .registry_file import LocalModelEntry

__all__ = ["build_model"]

_NETWORK_KINDS = {"diffusers-unet": diffusers_unet, "torchscript": torchscript}


def _hashes(entry: LocalModelEntry) -> dict[str, str]:
    """Weight and feature-network hashes: the keys under which cached reference statistics stay valid.

    An entry point's weights are unknown to us, so its reference statistics are recomputed rather than cached
    (unless the factory's own ModelSpec provides a weights_sha256).
    """
    out: dict[str, str] = {}
    if entry.kind in _NETWORK_KINDS:
        out["weights_sha256"] = _NETWORK_KINDS[entry.kind].weights_sha256(entry)
    out.update(features_hashes(entry))
    return out


def build_model(entry: LocalModelEntry) -> ModelSpec:
    """Load the weights and assemble the ModelSpec for one registry entry."""
    if entry.kind == "diffusers-pipeline":
        return diffusers_pipeline.build(entry)
    spec: Optional[ModelSpec] = None
    if entry.kind == "entrypoint":
        denoiser, shape, spec = entrypoint_denoiser(entry)
    else:
        denoiser, shape = network_denoiser(entry, _NETWORK_KINDS[entry.kind].load(entry))
    if not shape:
        raise ValueError(entry.err("shape", "is required: the factory returned no ModelSpec with a shape"))
    denoiser, process_note = registered(denoiser, entry)
    reference_sampler = spec.reference_sampler if spec else None
    reference_set = spec.reference_set if spec else None
    if entry.reference is not None:
        real = load_reference(entry, shape)
        denoiser.data_mean = real.mean(dim=0)

        def reference_sampler(n: int, generator: torch.Generator) -> torch.Tensor:
            return real[torch.randint(real.shape[0], (n,), generator=generator)].clone()

        def reference_set() -> torch.Tensor:
            return real.clone()

    features = features_of(entry) if entry.features is not None else (spec.features if spec else None)
    metric = entry.metric or ("fd-features" if features is not None and reference_sampler is not None else "fd")
    provenance = {"registry_entry": entry.where, "kind": entry.kind, "path": entry.path,
                  "process": denoiser.process.name, "process_note": process_note}
    provenance.update(_hashes(entry))
    if entry.guidance_scale is not None:
        provenance.update(guidance_scale=str(entry.guidance_scale), class_label=str(entry.class_label))
    return ModelSpec(name=entry.name, denoiser=denoiser, shape=tuple(shape),
                     description=entry.description or (spec.description if spec else f"{entry.kind} {entry.path}"),
                     default_metric=metric, reference_sampler=reference_sampler, reference_set=reference_set,
                     features=features,
                     exact=spec.exact if spec else None,
                     provenance={**(spec.provenance if spec else {}), **provenance})
