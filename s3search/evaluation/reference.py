"""Reference statistics, computed once per (model, metric, sample count, seed, split) and cached on disk.

Layout under $S3SEARCH_CACHE_DIR (default ~/.cache/s3search):

    reference/<model>/<metric>-n<n>-seed<seed>-<split>-<key>.safetensors   the named float64 tensors of
                                                                           Metric.reference_stats
    reference/<model>/<metric>-n<n>-seed<seed>-<split>-<key>.json          the provenance, plus when the file
                                                                           was written and its sha256

The provenance is everything the stats depend on: model, weights hash, feature-network hash, metric and its
version, n, seed, split, cache format and library versions. `<key>` is the first 16 hex digits of its sha256,
so the file name is the whole cache key: another model under the same name, a new metric version or a library
upgrade is a miss, computed and stored beside the old file, never a refusal. Old files are left for the user
to delete.

A hit is still checked: a JSON file that is unreadable or names other provenance (a hash collision, an edit),
or tensors that do not hash to the recorded sha256 (a torn or concurrent write), are recomputed and rewritten
with a warning in the log, since the cache holds nothing that cannot be computed again. `recompute=True`
rebuilds a file that checks out.

A model backed by a finite data set (`ModelSpec.reference_set`: real digits, a local model's reference file) has
a single reference, its whole set: n, seed and split all read "all" there. So does a text-to-image model's FID
reference file of images (`ModelSpec.image_reference`), whose sha256 is then part of the provenance; one of
precomputed statistics is used as it is, never copied into the cache. Models without a weights hash have
nothing to key the file on and are never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from .. import metrics
from ..models.base import ModelSpec
from .seeds import reference_seed

__all__ = ["cache_dir", "provenance", "provenance_key", "reference_paths", "load_or_compute", "FORMAT_VERSION",
           "ENV_CACHE_DIR", "WHOLE_SET"]

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "S3SEARCH_CACHE_DIR"
# 2: the provenance key is part of the file name.
FORMAT_VERSION = "2"
_LIBRARIES = ("torch", "numpy", "scipy", "safetensors", "s3search")
# Provenance fields that are facts about the file rather than about what it must match.
_UNCHECKED = ("created_at", "file_sha256")


def cache_dir(override: Optional[str | os.PathLike] = None) -> Path:
    if override is not None:
        return Path(override)
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "s3search")


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "absent"


def provenance(model: ModelSpec, metric: metrics.Metric, n: int | str, seed: int | str, split: str = "search"
               ) -> dict[str, str]:
    """Everything the cached stats depend on, as strings."""
    doc = {
        "format": FORMAT_VERSION,
        "model": model.name,
        "weights_sha256": model.provenance.get("weights_sha256", ""),
        "metric": metric.name,
        "metric_version": metric.version,
        "n": str(n),
        "seed": str(seed),
        "split": split,
        "features_sha256": model.provenance.get("features_sha256", "") if metric.needs_features else "",
    }
    if _image_reference(model, metric) is not None:
        doc["reference_sha256"] = model.image_reference.sha256
    doc.update({f"version_{lib}": _version(lib) for lib in _LIBRARIES})
    return doc


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part)


def provenance_key(prov: Mapping[str, str]) -> str:
    """16 hex digits of the sha256 of the provenance (without the facts about the file itself)."""
    doc = {k: v for k, v in prov.items() if k not in _UNCHECKED}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def reference_paths(root: Path, prov: Mapping[str, str]) -> tuple[Path, Path]:
    """The tensor and provenance files for the reference that `prov` (from `provenance`) describes."""
    name = f"{_safe(prov['metric'])}-n{prov['n']}-seed{prov['seed']}-{_safe(prov['split'])}-{provenance_key(prov)}"
    folder = root / "reference" / _safe(prov["model"])
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(tensor_path: Path, meta_path: Path, expected: Mapping[str, str]) -> Optional[str]:
    """Why the cached pair cannot be used, or None when it matches `expected` and its recorded sha256."""
    try:
        stored = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"its provenance {meta_path.name} is unreadable ({e})"
    if not isinstance(stored, dict):
        return f"its provenance {meta_path.name} is not a JSON object"
    diffs = [f"{k}: cached {stored.get(k)!r}, now {v!r}" for k, v in expected.items()
             if k not in _UNCHECKED and stored.get(k) != v]
    if diffs:
        return f"its provenance differs ({'; '.join(diffs)})"
    if not tensor_path.exists() or _sha256(tensor_path) != stored.get("file_sha256"):
        return "its tensors are missing or do not match the recorded sha256"
    return None


def _save(tensor_path: Path, meta_path: Path, stats: dict[str, torch.Tensor], prov: dict[str, str]) -> None:
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename, so a concurrent reader never sees half a file.
    tmp = tensor_path.with_name(f"{tensor_path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata={"format": FORMAT_VERSION})
    doc = {**prov, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "file_sha256": _sha256(tmp)}
    meta_tmp = meta_path.with_name(f"{meta_path.name}.tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, tensor_path)
    os.replace(meta_tmp, meta_path)


# How a model backed by a finite data set names its one reference (the whole set) in provenance and file names.
WHOLE_SET = "all"


def _image_reference(model: ModelSpec, metric: metrics.Metric):
    """The model's FID reference file where this metric reads it (feature metrics), else None."""
    return model.image_reference if metric.needs_features else None


def _request(model: ModelSpec, metric: metrics.Metric, n: int, seed: int, split: str
             ) -> tuple[int | str, int | str, str]:
    if model.reference_set is not None or _image_reference(model, metric) is not None:
        return WHOLE_SET, WHOLE_SET, WHOLE_SET
    return n, seed, split


def _compute(model: ModelSpec, metric: metrics.Metric, n: int, seed: int, split: str) -> dict[str, torch.Tensor]:
    if model.reference_set is not None:
        return metric.reference_stats(model, model.reference_set)

    def draw() -> torch.Tensor:
        g = torch.Generator().manual_seed(reference_seed(seed, split))
        if model.reference_sampler is not None:
            return model.reference_sampler(n, g)
        return model.exact.sample(n, g)

    return metric.reference_stats(model, draw)


def load_or_compute(model: ModelSpec, metric: metrics.Metric, n: int, seed: int = 0, split: str = "search", *,
                    root: Optional[str | os.PathLike] = None, recompute: bool = False) -> dict[str, torch.Tensor]:
    """The metric's reference stats for `model` from n reference samples drawn with `reference_seed(seed, split)`.

    The test split gets its own reference draw, so a search cannot fit the particular reference samples either.
    A model with a finite data set (`reference_set`) has one reference, the whole set, for every n, seed and split.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n={n!r} must be an integer >= 2")
    if not metric.needs_reference:
        return {}
    reference_file = _image_reference(model, metric)
    if reference_file is not None and reference_file.kind == "stats":
        return metric.reference_stats(model, lambda: reference_file.stats())
    key = _request(model, metric, n, seed, split)
    prov = provenance(model, metric, *key)
    if not prov["weights_sha256"] or (metric.needs_features and not prov["features_sha256"]):
        return _compute(model, metric, n, seed, split)
    tensor_path, meta_path = reference_paths(cache_dir(root), prov)
    if not recompute and (tensor_path.exists() or meta_path.exists()):
        problem = _check(tensor_path, meta_path, prov)
        if problem is None:
            return load_file(str(tensor_path))
        log.warning("cached reference %s is recomputed: %s", tensor_path, problem)
    stats = _compute(model, metric, n, seed, split)
    _save(tensor_path, meta_path, stats, prov)
    return stats
