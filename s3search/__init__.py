"""s3search: search the per-step choices of few-step diffusion samplers (S³), and run the schedules found.

    from s3search import SolverSchedule, sample, baselines, processes
    sched = baselines.get("dpmpp_2m", timesteps=[...], process="edm")
    x0 = sample(denoiser, x_T, sched, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import importlib
from typing import Any

from . import processes
from .schedule import SolverSchedule, StepSpec

__all__ = ["SolverSchedule", "StepSpec", "sample", "baselines", "processes", "grids"]
__version__ = "0.1.0"

_LAZY = {"sample": ("s3search.integrator", "sample"), "baselines": ("s3search.baselines", None),
         "grids": ("s3search.grids", None)}


def __getattr__(name: str) -> Any:
    # Imported on first use so `import s3search` stays cheap for the service layers.
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    raise AttributeError(f"module 's3search' has no attribute {name!r}")
