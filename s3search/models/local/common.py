"""Helpers every kind shares: paths and JSON files, the device, imports, reference data, features, hashes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..base import file_sha256
from .registry_file import LocalModelEntry

__all__ = ["device_of", "on_device", "existing", "read_json", "import_target", "load_reference", "features_of",
           "file_sha256", "features_hashes"]


def device_of(entry: LocalModelEntry) -> torch.device:
    if entry.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(entry.device)
    except RuntimeError:
        raise ValueError(entry.err("device", f"{entry.device!r} is not a torch device")) from None


def on_device(fn: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """Run the network on its device and hand the result back where the input lives, without gradients."""

    def wrapped(x: torch.Tensor, t_in: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = fn(x.to(device), t_in.to(device), *(lab.to(device) for lab in labels))
        return out.to(x.device)

    return wrapped


def existing(entry: LocalModelEntry, field_name: str, value: str, want_dir: bool,
             what_dir: str = "a diffusers UNet2DModel folder") -> Path:
    p = entry.resolve(value)
    if not p.exists():
        raise FileNotFoundError(entry.err(field_name, f"{p} does not exist"))
    if want_dir and not p.is_dir():
        raise ValueError(entry.err(field_name, f"{p} must be a directory ({what_dir})"))
    if not want_dir and not p.is_file():
        raise ValueError(entry.err(field_name, f"{p} must be a file"))
    return p


def read_json(entry: LocalModelEntry, path: Path, field_name: str = "path") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(entry.err(field_name, f"{path} is not valid JSON: {e}")) from None
    if not isinstance(data, dict):
        raise ValueError(entry.err(field_name, f"{path} must hold a JSON object"))
    return data


def import_target(entry: LocalModelEntry, field_name: str, target: str) -> Callable[..., Any]:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(entry.err(field_name, f"cannot import module {module_name!r}: {e}")) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ValueError(entry.err(field_name, f"{module_name!r} has no callable {attr!r}"))
    return obj


def load_reference(entry: LocalModelEntry, shape: tuple[int, ...]) -> torch.Tensor:
    path = existing(entry, "reference", entry.reference, want_dir=False)
    try:
        if path.suffix == ".npy":
            array = np.load(str(path), allow_pickle=False)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1 and "images" not in tensors:
                raise ValueError(f"holds {sorted(tensors)}; expected one tensor or one named 'images'")
            array = tensors["images"] if "images" in tensors else next(iter(tensors.values()))
        else:
            raise ValueError("must be a .npy or .safetensors file")
    except ValueError as e:
        raise ValueError(entry.err("reference", f"{path}: {e}")) from None
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != tuple(shape) or array.shape[0] < 2:
        raise ValueError(entry.err("reference", f"{path} has shape {array.shape}; expected [N >= 2, "
                                                f"{', '.join(map(str, shape))}]"))
    lo, hi = entry.data_range
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0 * (hi - lo) + lo)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(entry.err("reference", f"{path} has dtype {array.dtype}; use uint8 or float"))
    return torch.from_numpy(array.astype(np.float32))


def features_of(entry: LocalModelEntry) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if entry.features in (None, "none"):
        return None
    if entry.features == "inception":
        from ...metrics.fid import InceptionFeatures

        weights = str(entry.resolve(entry.inception_weights)) if entry.inception_weights else None
        return InceptionFeatures(weights, data_range=entry.data_range, device=device_of(entry))
    if entry.features == "digits":
        from ..digits_features import load_feature_fn

        return load_feature_fn()
    return import_target(entry, "features", entry.features)()


def features_hashes(entry: LocalModelEntry) -> dict[str, str]:
    """The feature network's hash, under which cached reference statistics stay valid."""
    out: dict[str, str] = {}
    if entry.features == "inception":
        from ...metrics.fid import resolve_weights_path

        try:
            weights = entry.resolve(entry.inception_weights) if entry.inception_weights else None
            out["features_sha256"] = file_sha256(resolve_weights_path(weights))
        except FileNotFoundError:
            pass  # reported, with where to put the file, when the features are first computed
    elif entry.features == "digits":
        from ..digits_features import FEATURES_FILE

        out["features_sha256"] = file_sha256(FEATURES_FILE)
    return out
