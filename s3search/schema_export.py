"""Write the JSON Schemas of the two schedule documents, generated from the types themselves (`make schema`):
a solver schedule (the per-step space) and a named schedule (a named sampler on a grid).

Run with the dev extras (pydantic reads the dataclass annotations); the sampling core itself does not need it.
The cross-field rules (decreasing times, history length, ranges of the process) are enforced by
`SolverSchedule.validate` and described in the schema's description.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).parent / "schemas" / "solver-schedule.schema.json"
NAMED_SCHEMA_PATH = Path(__file__).parent / "schemas" / "named-schedule.schema.json"


def build_schema() -> dict:
    from pydantic import TypeAdapter

    from .schedule import SCHEMA_VERSION, SolverSchedule

    schema = TypeAdapter(SolverSchedule).json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://s3search.dev/schemas/solver-schedule-v{SCHEMA_VERSION}.json"
    schema["description"] = (
        "A few-step diffusion sampler as data: N+1 process times (strictly decreasing, inside the process's time "
        "range) and N step specifications. steps[i].order may not exceed i+1 (one model output per earlier time). "
        "nfe is derived from the schedule and, when given, must match it.")
    props = schema["properties"]
    props["nfe"] = {"type": "integer", "minimum": 0, "readOnly": True,
                    "description": "model evaluations (derived; optional on input)"}
    props["timesteps"]["minItems"] = 2
    step = schema["$defs"]["StepSpec"]["properties"]
    step["order"].update(minimum=1, maximum=4)
    step["eta"].update(minimum=0)
    props["schema_version"].update(const=SCHEMA_VERSION)
    schema["additionalProperties"] = False
    schema["$defs"]["StepSpec"]["additionalProperties"] = False
    return schema


def build_named_schema() -> dict:
    """The document of a named sampler on a grid (`NamedSchedule.to_dict`): what a search returns when its
    winner is a baseline the per-step space cannot express (EDM Heun, multi-stage SEEDS). Parameter values are
    checked by the sampler itself (`NamedSchedule.validate`)."""
    from . import processes
    from .named import NAMED_SCHEMA_VERSION, sampler_names

    scalar = {"type": ["number", "string", "boolean", "null"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://s3search.dev/schemas/named-schedule-v{NAMED_SCHEMA_VERSION}.json",
        "title": "NamedSchedule",
        "description": ("A named sampler run on N+1 process times (strictly decreasing, inside the process's time "
                        "range), then x = D(x_N, t_N). params are the sampler's own keyword arguments; nfe is "
                        "derived and, when given, must match."),
        "type": "object", "additionalProperties": False, "required": ["sampler", "process", "timesteps"],
        "properties": {
            "schema_version": {"const": NAMED_SCHEMA_VERSION, "default": NAMED_SCHEMA_VERSION},
            "sampler": {"enum": sampler_names()},
            "process": {"enum": processes.names()},
            "timesteps": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 2},
            "params": {"type": "object", "additionalProperties": scalar, "default": {}},
            "final": {"const": "denoise", "default": "denoise"},
            "name": {"type": "string", "default": ""},
            "nfe": {"type": "integer", "minimum": 0, "readOnly": True,
                    "description": "model evaluations (derived; optional on input)"},
        },
    }


def main() -> None:
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    for path, schema in ((SCHEMA_PATH, build_schema()), (NAMED_SCHEMA_PATH, build_named_schema())):
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
