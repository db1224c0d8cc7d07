"""NamedSchedule: a named sampler on a timestep grid, as data (the counterpart of SolverSchedule)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .. import processes
from ..schedule import document_hash, parse_json
from .registry import get_sampler

__all__ = ["NamedSchedule", "NAMED_SCHEMA_VERSION"]

NAMED_SCHEMA_VERSION = 1
_FIELDS = ("schema_version", "sampler", "process", "timesteps", "params", "final", "name", "nfe")


def _check_value(value: Any, path: str) -> Any:
    # Parameters travel as JSON: only finite scalars, strings, booleans and null.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{path}={value!r} must be finite")
        return value
    raise ValueError(f"{path}={value!r} must be a number, string, boolean or null")


def _params_tuple(params: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        try:
            items = [tuple(p) for p in params]
        except TypeError:
            raise ValueError("params must be a mapping or a sequence of (key, value) pairs") from None
        if any(len(p) != 2 for p in items):
            raise ValueError("params must be a mapping or a sequence of (key, value) pairs")
    keys = [k for k, _ in items]
    for k in keys:
        if not isinstance(k, str):
            raise ValueError(f"params key {k!r} must be a string")
    if len(set(keys)) != len(keys):
        raise ValueError("params must not repeat a key")
    return tuple(sorted((k, _check_value(v, f"params.{k}")) for k, v in items))


@dataclass(frozen=True)
class NamedSchedule:
    """`sampler` run on `timesteps` (N + 1 times of `process`, noisiest first), then x = D(x_N, t_N)."""

    sampler: str
    process: str
    timesteps: tuple[float, ...]
    params: tuple[tuple[str, Any], ...] = ()
    final: str = "denoise"
    schema_version: int = NAMED_SCHEMA_VERSION
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.timesteps, (list, tuple)):
            raise ValueError("timesteps must be a list of numbers")
        object.__setattr__(self, "timesteps", tuple(
            float(t) if isinstance(t, int) and not isinstance(t, bool) else t for t in self.timesteps))
        object.__setattr__(self, "params", _params_tuple(self.params))
        self.validate()

    def validate(self) -> None:
        if self.schema_version != NAMED_SCHEMA_VERSION:
            raise ValueError(f"schema_version={self.schema_version!r} is not supported "
                             f"(expected {NAMED_SCHEMA_VERSION})")
        if not isinstance(self.sampler, str):
            raise ValueError(f"sampler={self.sampler!r} must be a sampler name")
        sampler = get_sampler(self.sampler)
        if not isinstance(self.process, str):
            raise ValueError(f"process={self.process!r} must be a process name")
        proc = processes.get(self.process)
        if self.final != "denoise":
            raise ValueError(f"final={self.final!r} must be denoise (named samplers end with x = D(x_N, t_N))")
        if not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r} must be a string")
        ts = self.timesteps
        if len(ts) < 2:
            raise ValueError(f"timesteps has {len(ts)} values; a schedule needs at least 2")
        for i, t in enumerate(ts):
            if isinstance(t, bool) or not isinstance(t, float) or not math.isfinite(t):
                raise ValueError(f"timesteps[{i}]={t!r} must be a finite number")
            proc.check_time(t, f"timesteps[{i}]")
        for i in range(1, len(ts)):
            if not ts[i] < ts[i - 1]:
                raise ValueError(f"timesteps[{i}]={ts[i]!r} must be below timesteps[{i - 1}]={ts[i - 1]!r} "
                                 "(times run from noisiest to cleanest)")
        sampler.resolve(dict(self.params))

    # ----- derived ----------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def resolved_params(self) -> dict[str, Any]:
        """Every parameter of the sampler, defaults filled in."""
        return get_sampler(self.sampler).resolve(dict(self.params))

    @property
    def nfe(self) -> int:
        return get_sampler(self.sampler).nfe(len(self.timesteps), self.resolved_params)

    @property
    def stochastic(self) -> bool:
        return get_sampler(self.sampler).stochastic(self.resolved_params)

    def canonical(self) -> "NamedSchedule":
        return replace(self, params=tuple(sorted(self.resolved_params.items())), name="")

    def canonical_hash(self) -> str:
        """Schedules that run identically (defaults spelled out or not) share this hash."""
        return document_hash(self.canonical().to_dict())

    # ----- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "sampler": self.sampler, "process": self.process,
                "timesteps": list(self.timesteps), "params": dict(self.params), "final": self.final,
                "name": self.name, "nfe": self.nfe}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, doc: Any) -> "NamedSchedule":
        if not isinstance(doc, dict):
            raise ValueError("a named schedule must be a JSON object")
        unknown = sorted(set(doc) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a field of a named schedule")
        for key in ("sampler", "process", "timesteps"):
            if key not in doc:
                raise ValueError(f"{key} is required")
        if not isinstance(doc["timesteps"], list):
            raise ValueError("timesteps must be a list of numbers")
        params = doc.get("params", {})
        if not isinstance(params, dict):
            raise ValueError("params must be an object")
        sched = cls(sampler=doc["sampler"], process=doc["process"], timesteps=tuple(doc["timesteps"]),
                    params=params, final=doc.get("final", "denoise"),
                    schema_version=doc.get("schema_version", NAMED_SCHEMA_VERSION), name=doc.get("name", "") or "")
        if "nfe" in doc and doc["nfe"] != sched.nfe:
            raise ValueError(f"nfe={doc['nfe']!r} does not match the schedule, which makes {sched.nfe} evaluations")
        return sched

    @classmethod
    def from_json(cls, text: str) -> "NamedSchedule":
        return cls.from_dict(parse_json(text))
