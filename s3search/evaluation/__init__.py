"""Scoring schedules: sample with fixed seeds, compute the job's metric. See `base` for the contract."""

from .base import EvalRequest, EvalResult, Evaluator

__all__ = ["EvalRequest", "EvalResult", "Evaluator"]
