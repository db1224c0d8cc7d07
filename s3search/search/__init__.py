"""Searching the solver-schedule space. `run_search` is the one entry point the CLI and the runner call."""
