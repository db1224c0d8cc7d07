"""bench/gpu_check.py runs as a smoke test on the CPU: a tiny pipeline evaluated in this process and under Ray,
with the same value in both places and the model's share of the time measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_locally_and_under_ray(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--n", "4", "--nfe", "3",
                          "--device", "cpu", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    local, ray = doc["rows"]
    assert local["where"] == "local" and ray["where"] == "ray"
    assert local["value"] == ray["value"]                          # the same evaluation in both places
    assert 0 < local["model_s"] <= local["wall_s"] and local["model_calls"] > 0
    assert ray["worker_eval_s"] > 0 and "model share" in run.stdout
