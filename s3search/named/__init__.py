"""Samplers that the solver-schedule space cannot express (multi-stage SEEDS, EDM Heun, ...), run by name.

Placeholder: the baselines work fills this package; `sample` dispatches a NamedSchedule to `run_named`.
"""
