"""The `s3search` command. Each area registers its own commands from its module in this package."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Search few-step diffusion solver schedules (S³), evaluate them, and serve the results.")

# Each module defines register(app: typer.Typer) -> None.
_COMMAND_MODULES = ("baselines_cmd", "search_cmd", "service_cmd", "worker_cmd", "export_cmd", "models_cmd",
                    "ays_cmd", "report_cmd", "predictor_cmd")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)


_register_all()


def main() -> None:
    app()
