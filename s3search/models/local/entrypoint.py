"""Kind `entrypoint`: "package.module:factory", whose factory(**options) returns a Denoiser or a ModelSpec.

For guidance it is called as factory(class_label=..., **options) for the conditional and unconditional denoisers.
"""

from __future__ import annotations

from typing import Any, Optional

from ...denoisers import Denoiser
from ..base import ModelSpec
from ..guidance import cfg
from .common import import_target
from .noise import entry_process
from .registry_file import LocalModelEntry

__all__ = ["entrypoint_denoiser"]


def entrypoint_denoiser(entry: LocalModelEntry) -> tuple[Denoiser, tuple[int, ...], Optional[ModelSpec]]:
    factory = import_target(entry, "path", entry.path)

    def call(**extra: Any) -> Any:
        made = factory(**entry.options, **extra)
        if isinstance(made, ModelSpec):
            return made
        if not isinstance(made, Denoiser):
            raise ValueError(entry.err("path", f"{entry.path} returned {type(made).__name__}; a factory must "
                                               "return an s3search.denoisers.Denoiser or a ModelSpec"))
        return made

    if entry.class_label is None:
        made = call()
    else:
        cond = call(class_label=entry.class_label)
        if entry.guidance_scale is None or entry.guidance_scale == 1.0:
            made = cond
        else:
            uncond = call(class_label=entry.null_label)
            dc = cond.denoiser if isinstance(cond, ModelSpec) else cond
            du = uncond.denoiser if isinstance(uncond, ModelSpec) else uncond
            made = cfg(dc, du, entry.guidance_scale, name=entry.name)
    spec = made if isinstance(made, ModelSpec) else None
    denoiser = made.denoiser if spec is not None else made
    if entry.process is not None and entry_process(entry, entry.process) != denoiser.process:
        raise ValueError(entry.err("process", f"the entry says {entry.process!r}; the factory's denoiser is on "
                                              f"{denoiser.process.name}"))
    return denoiser, entry.shape or (spec.shape if spec else ()), spec
