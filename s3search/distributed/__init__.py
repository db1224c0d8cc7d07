"""Evaluation on Ray: embedded by default, RAY_ADDRESS joins a cluster. See docs/ray.md."""

from .ray_evaluator import DEFAULT_FACTORY, EvalActorCore, RayEvaluator, ensure_ray, load_factory
from .settings import RaySettings

__all__ = ["RayEvaluator", "RaySettings", "EvalActorCore", "DEFAULT_FACTORY", "ensure_ray", "load_factory"]
