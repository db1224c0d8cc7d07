"""Service settings from the environment (pydantic-settings). Every size a request can ask for has a limit here."""

from __future__ import annotations

from typing import Optional

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from studies.db import DEFAULT_DATABASE_URL

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S3S_", extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias=AliasChoices("DATABASE_URL", "S3S_DATABASE_URL"))
    # Server-side model registry file (TOML/JSON); never taken from a request.
    model_registry: Optional[str] = Field(None, validation_alias=AliasChoices("S3SEARCH_MODEL_REGISTRY",
                                                                              "S3S_MODEL_REGISTRY"))
    # Saved predictors a job may warm-start from, by name (each subfolder a `Predictor.save` folder); the runner
    # reads the same variable (studies.warm.PREDICTORS_DIR_ENV). A request names one, never a path.
    predictors_dir: Optional[str] = None
    dashboard_url: str = "http://127.0.0.1:8080"
    # `s3search dashboard`: HTTP basic auth, required when it is bound to anything but loopback. The password
    # comes only from the environment: on the command line every local user would see it in `ps`.
    dashboard_user: str = Field("s3search", min_length=1, pattern="^[^:]+$")
    dashboard_password: Optional[SecretStr] = None
    migrate_on_start: bool = True
    # Verified API keys are remembered this long (seconds): a revoked key works at most this much longer.
    key_cache_ttl_s: float = Field(5.0, ge=0)

    # Limits on what a job may ask for.
    min_nfe: int = Field(2, ge=1)
    max_nfe: int = Field(50, ge=1)
    max_nfe_values: int = Field(16, ge=1)          # how many NFE values one job may search
    max_samples: int = Field(50_000, ge=1)         # n_samples per search evaluation
    max_test_samples: int = Field(50_000, ge=1)
    max_budget: int = Field(5_000, ge=1)           # true evaluations per job
    max_guidance_scale: float = Field(30.0, ge=0, le=100)   # classifier-free guidance of text-to-image jobs
    max_options: int = Field(32, ge=0)             # keys in the free-form `options` object
    max_request_bytes: int = Field(64 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024)      # all request header lines together
    max_page_size: int = Field(500, ge=1)
    max_active_jobs_per_owner: int = Field(100, ge=1)

    # Runner.
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0)      # a running job whose heartbeat is older is resumed elsewhere
    poll_interval_s: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    evaluator: str = Field("local", pattern="^(local|ray)$")   # where the runner evaluates candidates
    eval_cache: bool = True                                    # reuse evaluations stored in the database


def get_settings() -> Settings:
    return Settings()
