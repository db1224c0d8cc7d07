"""The published JSON Schema is generated from the type, is current, and agrees with the validator."""

import json

import jsonschema
import pytest

from s3search import SolverSchedule, StepSpec
from s3search.schema_export import SCHEMA_PATH, build_schema


def test_committed_schema_is_current():
    assert json.loads(SCHEMA_PATH.read_text()) == build_schema(), "run `make schema` and commit the result"


def test_schema_accepts_valid_and_rejects_field_errors():
    schema = json.loads(SCHEMA_PATH.read_text())
    doc = json.loads(SolverSchedule(process="edm", timesteps=(80.0, 1.0, 0.01),
                                    steps=(StepSpec(), StepSpec(order=2, eta=0.5))).to_json())
    jsonschema.validate(doc, schema)
    for path, value in [(("steps", 0, "eta"), -1.0), (("steps", 1, "order"), 7), (("process",), "nope"),
                        (("final",), "maybe"), (("steps", 0, "corrector"), "x")]:
        bad = json.loads(json.dumps(doc))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ValueError):
            SolverSchedule.from_dict(bad)


def test_schema_lists_every_registered_process():
    from s3search import processes

    schema = json.loads(SCHEMA_PATH.read_text())
    assert sorted(schema["properties"]["process"]["enum"]) == processes.names()


def test_named_schedule_schema_is_current_and_accepts_every_baseline_that_is_a_named_sampler():
    from s3search import baselines, grids
    from s3search.named import NamedSchedule
    from s3search.schema_export import NAMED_SCHEMA_PATH, build_named_schema

    schema = json.loads(NAMED_SCHEMA_PATH.read_text())
    assert schema == build_named_schema(), "run `make schema` and commit the result"
    ts = grids.get("logsnr", process="edm", n=5)
    named = [s for s in (baselines.get(n, timesteps=ts, process="edm") for n in baselines.names())
             if isinstance(s, NamedSchedule)]
    assert named
    solver_schema = json.loads(SCHEMA_PATH.read_text())
    for sched in named:
        doc = sched.to_dict()
        jsonschema.validate(doc, schema)
        with pytest.raises(jsonschema.ValidationError):    # one document, one schema
            jsonschema.validate(doc, solver_schema)
        assert NamedSchedule.from_dict(doc) == sched
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**named[0].to_dict(), "sampler": "no-such"}, schema)
