"""Write the JSON Schema of a solver schedule, generated from the dataclasses themselves (`make schema`).

Run with the dev extras (pydantic reads the dataclass annotations); the sampling core itself does not need it.
The cross-field rules (decreasing times, history length, ranges of the process) are enforced by
`SolverSchedule.validate` and described in the schema's description.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).parent / "schemas" / "solver-schedule.schema.json"


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


def main() -> None:
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(json.dumps(build_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
