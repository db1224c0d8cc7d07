"""FID reference of a text-to-image model: precomputed Inception statistics, or reference images to compute them.

One file, read by `open_reference`:
- an `.npz` holding `mu` [2048] and `sigma` [2048, 2048], as pytorch-fid and clean-fid write them: used as they
  are, never recomputed;
- an `.npy`, or an `.npz` holding one array (or one named `images`): images [N, H, W, 3] or [N, 3, H, W], uint8
  (0 .. 255) or float (0 .. 1). Their Inception statistics are computed on first use and cached by
  evaluation.reference (the file's sha256 is part of the cache key).

Shapes and dtypes are read from the array headers, so a wrong file fails before anything large is read. Nothing
is unpickled (`allow_pickle=False`). An `.npy` is memory-mapped and read in batches; an `.npz` member is read
whole, so keep a large image set as `.npy`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..models.base import file_sha256

__all__ = ["INCEPTION_DIMS", "InceptionReference", "open_reference", "array_headers"]

INCEPTION_DIMS = 2048
_F64 = torch.float64


def _header(fp) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fp)
    return tuple(shape), dtype


def array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of each array in an .npy ("" for its one array) or .npz, without reading the data."""
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as fp:
                return {"": _header(fp)}
        if path.suffix == ".npz":
            out = {}
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    if member.endswith(".npy"):
                        with z.open(member) as fp:
                            out[member[:-4]] = _header(fp)
            return out
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable numpy file: {e}") from None
    raise ValueError(f"{path} must be an .npz (mu, sigma or images) or an .npy (images)")


@dataclass(frozen=True, eq=False)
class InceptionReference:
    """The reference of `fid` for a model whose samples are images; `stats()` or `image_batches()` by kind."""

    path: Path
    sha256: str
    kind: str                                   # "stats" | "images"
    shape: tuple[int, ...]                      # mu's shape, or the image array's
    array: str = ""                             # the image array's name inside an .npz
    _stats: Optional[dict[str, torch.Tensor]] = None

    @property
    def n_images(self) -> Optional[int]:
        return self.shape[0] if self.kind == "images" else None

    def stats(self) -> dict[str, torch.Tensor]:
        """The precomputed statistics as metrics name them: mean [2048], cov [2048, 2048], float64."""
        if self._stats is None:
            raise ValueError(f"{self.path} holds reference images, not statistics")
        return self._stats

    def image_batches(self, batch: int = 256) -> Iterator[torch.Tensor]:
        """The reference images as float32 [b, 3, H, W] in [-1, 1], the data_range of the Inception features."""
        if self.kind != "images":
            raise ValueError(f"{self.path} holds statistics, not images")
        if self.path.suffix == ".npy":
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(self.path, allow_pickle=False) as z:
                array = z[self.array]
        channels_last = self.shape[-1] == 3
        for i in range(0, len(array), batch):
            chunk = np.asarray(array[i:i + batch])
            chunk = np.moveaxis(chunk, -1, 1) if channels_last else chunk
            if chunk.dtype == np.uint8:
                yield torch.from_numpy(chunk.astype(np.float32) / 127.5 - 1.0)
                continue
            chunk = chunk.astype(np.float32)
            if not np.all(np.isfinite(chunk)) or chunk.min() < 0.0 or chunk.max() > 1.0:
                raise ValueError(f"{self.path}: float reference images must lie in [0, 1] (rows {i} .. "
                                 f"{i + len(chunk) - 1} do not); store uint8 0 .. 255 or floats in [0, 1]")
            yield torch.from_numpy(chunk * 2.0 - 1.0)


def _image_layout(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[0] >= 2 and (shape[-1] == 3 or shape[1] == 3) and min(shape) >= 1


def open_reference(path: str | Path, dims: int = INCEPTION_DIMS) -> InceptionReference:
    """Check and open a reference file; ValueError says what is wrong with it (the caller names the field)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    headers = array_headers(path)
    if "mu" in headers or "sigma" in headers:
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = headers.get("mu", ((), None)), \
            headers.get("sigma", ((), None))
        if mu_dtype is None or sigma_dtype is None:
            raise ValueError(f"{path} holds {'mu' if mu_dtype is not None else 'sigma'} without "
                             f"{'sigma' if mu_dtype is not None else 'mu'}; Inception statistics need both")
        if mu_shape != (dims,) or sigma_shape != (dims, dims):
            raise ValueError(f"{path} holds mu {list(mu_shape)} and sigma {list(sigma_shape)}; FID's Inception "
                             f"statistics are mu [{dims}] and sigma [{dims}, {dims}] (pool features)")
        if not (np.issubdtype(mu_dtype, np.floating) and np.issubdtype(sigma_dtype, np.floating)):
            raise ValueError(f"{path}: mu and sigma must be floating point, not {mu_dtype} and {sigma_dtype}")
        with np.load(path, allow_pickle=False) as z:
            mean, cov = torch.from_numpy(z["mu"].astype(np.float64)), torch.from_numpy(z["sigma"].astype(np.float64))
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError(f"{path}: mu or sigma holds NaN or inf")
        return InceptionReference(path, file_sha256(path), "stats", mu_shape, _stats={"mean": mean, "cov": cov})
    name = "" if path.suffix == ".npy" else ("images" if "images" in headers else
                                            next(iter(headers)) if len(headers) == 1 else None)
    if name is None:
        raise ValueError(f"{path} holds {sorted(headers) or 'no arrays'}; expected mu and sigma (statistics), or "
                         "one array of images (or one named 'images')")
    shape, dtype = headers[name]
    if not _image_layout(shape):
        raise ValueError(f"{path} holds an array of shape {list(shape)}; reference images are [N >= 2, H, W, 3] or "
                         "[N >= 2, 3, H, W]")
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{path}: reference images must be uint8 (0 .. 255) or float (0 .. 1), not {dtype}")
    return InceptionReference(path, file_sha256(path), "images", shape, array=name)
