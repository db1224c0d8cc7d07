"""Reference statistics, computed once per (model, metric, sample count, seed, split) and cached on disk.

Layout under $S3SEARCH_CACHE_DIR (default ~/.cache/s3search):

    reference/<model>/<metric>-n<n>-seed<seed>-<split>.safetensors   the named float64 tensors of
                                                                     Metric.reference_stats
    reference/<model>/<metric>-n<n>-seed<seed>-<split>.json          provenance: model, weights hash, metric and
                                                                     its version, n, seed, split, feature-network
                                                                     hash, library versions, sha256 of the tensors

A model backed by a finite data set (`ModelSpec.reference_set`: real digits, a local model's reference file) has
a single reference, its whole set: n, seed and split all read "all" there.

The file name holds only the request; everything that could make the stats stale (weights, feature network,
metric version, libraries) lives in the provenance. A cached file whose provenance differs from the current one,
or whose tensors do not hash to the recorded value, is refused with `StaleReferenceError`; it is rebuilt only
when the caller passes `recompute=True`. Models without a weights hash cannot be checked and are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .. import metrics
from ..models.base import ModelSpec
from .seeds import reference_seed

__all__ = ["StaleReferenceError", "cache_dir", "provenance", "reference_paths", "load_or_compute",
           "FORMAT_VERSION", "ENV_CACHE_DIR", "WHOLE_SET"]

ENV_CACHE_DIR = "S3SEARCH_CACHE_DIR"
FORMAT_VERSION = "1"
_LIBRARIES = ("torch", "numpy", "scipy", "safetensors", "s3search")
# Provenance fields that are facts about the file rather than about what it must match.
_UNCHECKED = ("created_at", "file_sha256")


class StaleReferenceError(ValueError):
    """A cached reference does not match the model, metric or libraries it would be used with."""


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
    doc.update({f"version_{lib}": _version(lib) for lib in _LIBRARIES})
    return doc


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part)


def reference_paths(root: Path, model: str, metric: str, n: int | str, seed: int | str, split: str = "search"
                    ) -> tuple[Path, Path]:
    stem = root / "reference" / _safe(model) / f"{_safe(metric)}-n{n}-seed{seed}-{_safe(split)}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(tensor_path: Path, meta_path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor]:
    try:
        stored = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StaleReferenceError(f"reference provenance {meta_path} is unreadable ({e}); "
                                  "recompute it (recompute=True / --recompute-reference)") from None
    diffs = [f"{k}: cached {stored.get(k)!r}, now {v!r}" for k, v in expected.items() if stored.get(k) != v]
    if diffs:
        raise StaleReferenceError(f"cached reference {tensor_path} does not match: {'; '.join(diffs)}. "
                                  "Recompute it (recompute=True / --recompute-reference) or delete the file")
    if not tensor_path.exists() or _sha256(tensor_path) != stored.get("file_sha256"):
        raise StaleReferenceError(f"cached reference {tensor_path} is missing or does not match its recorded "
                                  "sha256; recompute it (recompute=True / --recompute-reference)")
    return load_file(str(tensor_path))


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


def _request(model: ModelSpec, n: int, seed: int, split: str) -> tuple[int | str, int | str, str]:
    if model.reference_set is not None:
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
    key = _request(model, n, seed, split)
    prov = provenance(model, metric, *key)
    if not prov["weights_sha256"] or (metric.needs_features and not prov["features_sha256"]):
        return _compute(model, metric, n, seed, split)
    tensor_path, meta_path = reference_paths(cache_dir(root), model.name, metric.name, *key)
    if not recompute and (tensor_path.exists() or meta_path.exists()):
        return _load(tensor_path, meta_path, {k: v for k, v in prov.items() if k not in _UNCHECKED})
    stats = _compute(model, metric, n, seed, split)
    _save(tensor_path, meta_path, stats, prov)
    return stats
