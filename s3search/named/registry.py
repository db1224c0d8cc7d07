"""The registry of named samplers: samplers the solver-schedule space cannot express, run by name.

Each sampler is a small pure function with one signature,
    fn(denoiser, x, timesteps, process, generator, **params) -> Tensor,
plus its evaluation count as a function of the number of timesteps, and a declaration of its parameters
(defaults and checks), so a schedule naming it can be validated before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..noise import GeneratorArg
from ..processes import NoiseProcess

__all__ = ["Param", "NamedSampler", "register", "get_sampler", "sampler_names", "number", "integer", "choice",
           "optional_number", "SamplerFn"]

SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Param:
    """One parameter of a named sampler: its default and a check that raises ValueError naming the field."""

    default: Any
    check: Callable[[Any, str], Any]
    doc: str = ""


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[Any, str], float]:
    def check(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}={value!r} must be a finite number")
        if value < lo or value > hi or (lo_open and value == lo):
            bracket = "(" if lo_open else "["
            raise ValueError(f"{path}={value!r} must lie in {bracket}{lo}, {hi}]")
        return float(value)
    return check


def optional_number(lo: float = -math.inf) -> Callable[[Any, str], Optional[float]]:
    inner = number(lo)

    def check(value: Any, path: str) -> Optional[float]:
        return None if value is None else inner(value, path)
    return check


def integer(lo: int, hi: int) -> Callable[[Any, str], int]:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{path}={value!r} must be an integer from {lo} to {hi}")
        return value
    return check


def choice(*allowed: str) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        if value not in allowed:
            raise ValueError(f"{path}={value!r} must be one of {', '.join(allowed)}")
        return value
    return check


@dataclass(frozen=True)
class NamedSampler:
    name: str
    fn: SamplerFn
    nfe: Callable[[int, Mapping[str, Any]], int]   # (number of timesteps, full params) -> model evaluations
    params: Mapping[str, Param] = field(default_factory=dict)
    stochastic: Callable[[Mapping[str, Any]], bool] = lambda p: False
    description: str = ""
    paper: str = ""
    # Checks across parameters (raise ValueError naming the field), run whenever parameters are resolved.
    check: Callable[[Mapping[str, Any]], None] = lambda p: None

    def resolve(self, params: Mapping[str, Any], path: str = "params") -> dict[str, Any]:
        """All parameters with defaults filled in, each checked; unknown keys are errors."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"{path}.{unknown[0]} is not a parameter of sampler {self.name!r} (known: {known})")
        out = {}
        for key, spec in self.params.items():
            value = params.get(key, spec.default)
            out[key] = spec.check(value, f"{path}.{key}") if key in params else value
        self.check(out)
        return out

    def __call__(self, denoiser: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
                 timesteps: Sequence[float], process: NoiseProcess, generator: GeneratorArg = None,
                 **params: Any) -> torch.Tensor:
        return self.fn(denoiser, x, tuple(float(t) for t in timesteps), process, generator,
                       **self.resolve(params))


_SAMPLERS: dict[str, NamedSampler] = {}


def register(sampler: NamedSampler) -> NamedSampler:
    if sampler.name in _SAMPLERS:
        raise ValueError(f"sampler={sampler.name!r} is already registered")
    _SAMPLERS[sampler.name] = sampler
    return sampler


def get_sampler(name: str) -> NamedSampler:
    if name not in _SAMPLERS:
        raise ValueError(f"sampler={name!r} is unknown; known named samplers: {', '.join(sampler_names())}")
    return _SAMPLERS[name]


def sampler_names() -> list[str]:
    return sorted(_SAMPLERS)
