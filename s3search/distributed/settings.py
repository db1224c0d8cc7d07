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

The same settings system as the service's (api/settings.py): a pydantic-settings class whose fields carry the
defaults and bounds, with the variable names derived from `env_prefix` (RAY_ADDRESS is Ray's own name). Built
with arguments, `RaySettings(...)` is exactly those arguments; `RaySettings.from_env()` reads the variables.
pydantic-settings comes with the `search` extra, as Ray does; the sampling core never imports this module.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["RaySettings", "ENV_PREFIX", "ADDRESS_VARIABLE", "env_names"]

ENV_PREFIX = "S3SEARCH_RAY_"
ADDRESS_VARIABLE = "RAY_ADDRESS"


def _env_name(field_name: str) -> str:
    return ADDRESS_VARIABLE if field_name == "address" else ENV_PREFIX + field_name.upper()


class _Variables(PydanticBaseSettingsSource):
    """The settings' variables in a mapping (os.environ unless given); an empty value counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = _env_name(field_name)
        raw = self.env.get(name)
        return (raw.strip() if raw is not None and raw.strip() else None), name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[field_name] = value
        return values


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True)

    address: Optional[str] = Field(None, validation_alias=AliasChoices("address", ADDRESS_VARIABLE),
                                   description="None: embedded Ray")
    cpus_per_eval: float = Field(1.0, ge=0, allow_inf_nan=False)
    gpus_per_eval: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_in_flight: int = Field(0, ge=0, description="0: derived from the cluster's resources")
    max_retries: int = Field(2, ge=0)
    batch_size: int = Field(0, ge=0, description="0: adaptive, about 1 s of evaluation per task")
    embedded_cpus: int = Field(0, ge=0, description="0: let Ray count this machine's cores")
    timeout_s: float = Field(0.0, ge=0, allow_inf_nan=False, description="per candidate of a batch; 0: no limit")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what is passed: from_env hands the variables in through a source of its own.
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans(cls, values: Any) -> Any:
        # pydantic would read True as 1 CPU; a flag where a count belongs is a mistake.
        if isinstance(values, dict):
            for name, value in values.items():
                if isinstance(value, bool):
                    raise ValueError(f"{name}={value!r} must be a number")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "RaySettings":
        if self.cpus_per_eval == 0 and self.gpus_per_eval == 0:
            raise ValueError("cpus_per_eval=0 needs gpus_per_eval > 0: an actor must reserve some resource")
        if self.gpus_per_eval > 1 and self.gpus_per_eval != int(self.gpus_per_eval):
            raise ValueError(f"gpus_per_eval={self.gpus_per_eval!r} above 1 must be a whole number")
        if self.address is not None and not self.address.strip():
            raise ValueError(f"address={self.address!r} must be a non-empty string or None")
        return self

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "RaySettings":
        """The settings from `env` (default: os.environ); a bad value raises ValueError naming its variable."""
        source = _Variables(cls, os.environ if env is None else env)
        values = source()
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err.get("loc") else ""
            if field in values:
                raise ValueError(f"{_env_name(field)}={values[field]!r}: {err['msg']}") from None
            raise ValueError(err["msg"].removeprefix("Value error, ")) from None

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


def env_names() -> dict[str, str]:
    """Field name -> the variable that sets it."""
    return {name: _env_name(name) for name in RaySettings.model_fields}

