"""Models a search can score schedules on: built-in test beds and models loaded from a local path."""

from .base import ModelSpec

__all__ = ["ModelSpec"]
