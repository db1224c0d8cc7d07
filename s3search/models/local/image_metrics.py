"""The image metrics of a `diffusers-pipeline` entry: FID against `reference_stats`, CLIP score with `clip`.

Both files are checked when the model is built, before the pipeline is loaded, and errors name the entry and the
field. Their hashes go into the provenance, so cached reference statistics and stored evaluations follow them:
`reference_stats_sha256` (the file), `features_sha256` (the Inception weights file, when it is there yet) and
`clip_sha256` (every file of the CLIP folder).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .common import device_of, file_sha256
from .registry_file import LocalModelEntry

__all__ = ["ImageMetricParts", "image_metric_parts"]


@dataclass
class ImageMetricParts:
    features: Optional[Any] = None          # metrics.fid.InceptionFeatures on decoded images
    image_reference: Optional[Any] = None   # metrics.reference_stats.InceptionReference
    clip: Optional[Any] = None              # metrics.clip.CLIPScorer
    provenance: dict[str, str] = field(default_factory=dict)


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _fid_parts(entry: LocalModelEntry, parts: ImageMetricParts) -> None:
    from ...metrics.fid import InceptionFeatures, resolve_weights_path
    from ...metrics.reference_stats import open_reference

    try:
        parts.image_reference = open_reference(entry.resolve(entry.reference_stats))
    except ValueError as e:
        raise ValueError(entry.err("reference_stats", str(e))) from None
    weights = str(entry.resolve(entry.inception_weights)) if entry.inception_weights else None
    parts.features = InceptionFeatures(weights, data_range=(-1.0, 1.0), device=device_of(entry))
    parts.provenance["reference_stats_sha256"] = parts.image_reference.sha256
    try:
        parts.provenance["features_sha256"] = file_sha256(resolve_weights_path(weights))
    except FileNotFoundError:
        pass  # metric_error reports it, with where to put the file; stats are then not cached


def _clip_parts(entry: LocalModelEntry, parts: ImageMetricParts) -> None:
    from ...metrics.clip import CLIPScorer, check_clip_folder

    folder = entry.resolve(entry.clip)
    try:
        check_clip_folder(folder)
    except ValueError as e:
        raise ValueError(entry.err("clip", str(e))) from None
    parts.clip = CLIPScorer(folder, device=device_of(entry), batch_size=entry.batch_size)
    parts.provenance["clip_sha256"] = _folder_sha256(folder)


def image_metric_parts(entry: LocalModelEntry) -> ImageMetricParts:
    parts = ImageMetricParts()
    if entry.reference_stats is not None:
        _fid_parts(entry, parts)
    if entry.clip is not None:
        _clip_parts(entry, parts)
    return parts
