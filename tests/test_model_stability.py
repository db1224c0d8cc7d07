"""Built-in models are the same bits whatever the thread count: cached references and stored evaluations are
keyed by their fingerprints, so a fingerprint that moved with OMP_NUM_THREADS would make every cache miss (or,
before the key held it, refuse) between a 1-thread and a 2-thread process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]

# Each run builds every built-in model in a fresh process (a model built once is cached for the process) and
# prints what identifies it: the weights hash, the whole-spec fingerprint and the exact data mean's bytes.
_SCRIPT = """
import hashlib, json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from s3search.models import registry
out = {}
for name in registry.names():
    spec = registry.get(name)
    mean = spec.denoiser.data_mean
    out[name] = {
        "weights_sha256": spec.provenance.get("weights_sha256", ""),
        "fingerprint": spec.fingerprint,
        "data_mean": hashlib.sha256(mean.numpy().tobytes()).hexdigest() if mean is not None else "",
        "threads": torch.get_num_threads(),
    }
print(json.dumps(out))
"""


def _fingerprints(threads: int) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "S3SEARCH_MODEL_REGISTRY"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               PYTHONPATH=str(_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads)], env=env, cwd=_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_builtin_models_are_bit_stable_across_thread_counts():
    one, two = _fingerprints(1), _fingerprints(2)
    # The runs really used the thread counts asked for (else the comparison below proves nothing).
    assert {v.pop("threads") for v in one.values()} == {1} and {v.pop("threads") for v in two.values()} == {2}
    assert set(one) == set(two) and {"gmm-64d", "gmm-64d-vp", "gmm-image", "digits"} <= set(one)
    assert all(v["weights_sha256"] and v["fingerprint"] for v in one.values())
    differ = {name: (one[name], two[name]) for name in one if one[name] != two[name]}
    assert not differ, differ
