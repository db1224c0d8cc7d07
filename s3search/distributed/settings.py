"""Ray execution settings, read from the environment with defaults that need no set-up.

    RAY_ADDRESS                      join this cluster ("auto", "HOST:PORT", "ray://HOST:10001");
                                     unset: start an embedded Ray in this process
    S3SEARCH_RAY_CPUS_PER_EVAL       CPUs one evaluation actor reserves (default 1)
    S3SEARCH_RAY_GPUS_PER_EVAL       GPUs one evaluation actor reserves (default 0; fractions share a GPU)
    S3SEARCH_RAY_MAX_IN_FLIGHT       evaluation actors, i.e. batches evaluated at once (default 0 = as many
                                     as the cluster's CPUs / GPUs allow)
    S3SEARCH_RAY_MAX_RETRIES         times a batch is retried after its worker process died (default 2)
    S3SEARCH_RAY_BATCH_SIZE          most candidates per Ray task (default 0 = about 1 s of work per task,
                                     from the evaluation times seen so far; 1 before the first); the last
                                     tasks of a call are smaller, so the workers finish together
    S3SEARCH_RAY_EMBEDDED_CPUS       CPUs an embedded Ray may use (default 0 = all of this machine's)
    S3SEARCH_RAY_TIMEOUT_S           seconds per candidate a batch may take before its actor is killed and
                                     the batch retried (default 0 = no limit)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["RaySettings", "ENV_PREFIX"]

ENV_PREFIX = "S3SEARCH_RAY_"


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={raw!r} must be {kind}") from None
    return value


@dataclass(frozen=True)
class RaySettings:
    address: Optional[str] = None       # None: embedded Ray
    cpus_per_eval: float = 1.0
    gpus_per_eval: float = 0.0
    max_in_flight: int = 0              # 0: derived from the cluster's resources
    max_retries: int = 2
    batch_size: int = 0                 # 0: adaptive, about 1 s of evaluation per task
    embedded_cpus: int = 0              # 0: let Ray count this machine's cores
    timeout_s: float = 0.0              # per candidate of a batch; 0: no limit

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            ("cpus_per_eval", self.cpus_per_eval, 0.0, False),
            ("gpus_per_eval", self.gpus_per_eval, 0.0, False),
            ("max_in_flight", self.max_in_flight, 0, True),
            ("max_retries", self.max_retries, 0, True),
            ("batch_size", self.batch_size, 0, True),
            ("embedded_cpus", self.embedded_cpus, 0, True),
            ("timeout_s", self.timeout_s, 0.0, False),
        ]
        for name, value, low, integer in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}={value!r} must be a number")
            if integer and not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be an integer")
            if not math.isfinite(value) or value < low:
                raise ValueError(f"{name}={value!r} must be a finite number >= {low}")
        if self.cpus_per_eval == 0 and self.gpus_per_eval == 0:
            raise ValueError("cpus_per_eval=0 needs gpus_per_eval > 0: an actor must reserve some resource")
        if self.gpus_per_eval > 1 and self.gpus_per_eval != int(self.gpus_per_eval):
            raise ValueError(f"gpus_per_eval={self.gpus_per_eval!r} above 1 must be a whole number")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ValueError(f"address={self.address!r} must be a non-empty string or None")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "RaySettings":
        env = os.environ if env is None else env
        address = env.get("RAY_ADDRESS") or None
        p = ENV_PREFIX
        return cls(
            address=address.strip() if address else None,
            cpus_per_eval=_number(env, p + "CPUS_PER_EVAL", 1.0, integer=False),
            gpus_per_eval=_number(env, p + "GPUS_PER_EVAL", 0.0, integer=False),
            max_in_flight=int(_number(env, p + "MAX_IN_FLIGHT", 0, integer=True)),
            max_retries=int(_number(env, p + "MAX_RETRIES", 2, integer=True)),
            batch_size=int(_number(env, p + "BATCH_SIZE", 0, integer=True)),
            embedded_cpus=int(_number(env, p + "EMBEDDED_CPUS", 0, integer=True)),
            timeout_s=_number(env, p + "TIMEOUT_S", 0.0, integer=False),
        )

    def actors_for(self, cluster: Mapping[str, float]) -> int:
        """How many evaluation actors fit: max_in_flight when set, else what the cluster's resources allow."""
        if self.max_in_flight:
            return self.max_in_flight
        fits = []
        if self.cpus_per_eval > 0:
            fits.append(int(cluster.get("CPU", 0) // self.cpus_per_eval))
        if self.gpus_per_eval > 0:
            fits.append(int(cluster.get("GPU", 0) // self.gpus_per_eval))
        return max(1, min(fits))
