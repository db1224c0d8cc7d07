"""FID with Inception features from a local weights file, through torchmetrics and torch-fidelity.

The network is torchmetrics' `NoTrainInceptionV3` (torch-fidelity's `FeatureExtractorInceptionV3`, the TF-FID
port) and the distance is torchmetrics' `FrechetInceptionDistance`. Nothing is downloaded: the weights come from
a file named by the `weights_path` argument or $S3SEARCH_INCEPTION_WEIGHTS, else the default location below;
when none exists the error says which file to put where.

Two details differ from calling the libraries directly, on purpose:
- torch-fidelity's package `__init__` imports torchvision (not installable here without a CUDA torch), so the
  package is registered as a bare namespace before its submodule is imported (`_torch_fidelity_inception`).
- torch-fidelity loads a weights path with `torch.load(weights_only=False)`, which would run any pickle in the
  file. We read the file ourselves — safetensors, or a .pth through `torch.load(weights_only=True)`, which only
  accepts tensors — and hand the state dict to the constructor in place of its download hook.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = [
    "ENV_WEIGHTS",
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
    "default_weights_path",
    "resolve_weights_path",
    "load_inception",
    "to_uint8_rgb",
    "InceptionFeatures",
    "fid_from_stats",
    "frechet_inception_distance",
]

ENV_WEIGHTS = "S3SEARCH_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
FEATURE_LAYERS = ("64", "192", "768", "2048")

_BUILD_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str, float, str], nn.Module] = {}


def default_weights_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "s3search" / WEIGHTS_FILENAME


def _missing_message(detail: str) -> str:
    return (f"{detail}. FID needs torch-fidelity's InceptionV3 FID weights, file {WEIGHTS_FILENAME} "
            f"(or the same state dict saved as .safetensors). Nothing is downloaded at run time: fetch it on a "
            f"machine with internet access from {WEIGHTS_URL}, copy it to every worker, and either set "
            f"{ENV_WEIGHTS}=/path/to/{WEIGHTS_FILENAME} or place it at {default_weights_path()}")


def resolve_weights_path(weights_path: Optional[str | os.PathLike] = None) -> Path:
    """The Inception weights file: the argument, else $S3SEARCH_INCEPTION_WEIGHTS, else the default location."""
    if weights_path is not None and str(weights_path).strip():
        path, source = Path(weights_path).expanduser(), "weights_path"
    elif os.environ.get(ENV_WEIGHTS, "").strip():
        path, source = Path(os.environ[ENV_WEIGHTS].strip()).expanduser(), ENV_WEIGHTS
    else:
        path, source = default_weights_path(), "the default location"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(_missing_message(f"Inception weights file {path} (from {source}) {what}"))
    return path


def _torch_fidelity_inception() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3, importable even where the package __init__ is not."""
    if "torch_fidelity" not in sys.modules:
        try:
            importlib.import_module("torch_fidelity")
        except ImportError:
            spec = importlib.util.find_spec("torch_fidelity")
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError("FID needs the torch-fidelity package (pip install --no-deps "
                                          "torch-fidelity)") from None
            package = types.ModuleType("torch_fidelity")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def _torchmetrics_fid() -> types.ModuleType:
    _torch_fidelity_inception()  # must be importable before torchmetrics looks for it
    return importlib.import_module("torchmetrics.image.fid")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a wrong format surfaces as many different exception types
        raise ValueError(f"Inception weights file {path} could not be read as a state dict "
                         f"(.safetensors, or a .pth holding tensors only): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights file {path} does not hold a state dict of tensors")
    return state


@contextmanager
def _weights_from(module: types.ModuleType, state: dict[str, torch.Tensor]) -> Iterator[None]:
    # The constructor fetches weights through this module-level hook when no path is given; answer it with the
    # state dict already read. The lock keeps the swap private to this thread.
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def load_inception(weights_path: Optional[str | os.PathLike] = None, feature: str = "2048",
                   device: str | torch.device = "cpu") -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 with the local weights; output [B, int(feature)] for uint8 RGB input."""
    if str(feature) not in FEATURE_LAYERS:
        raise ValueError(f"feature={feature!r} must be one of {', '.join(FEATURE_LAYERS)}")
    path = resolve_weights_path(weights_path)
    key = (str(path.resolve()), str(feature), path.stat().st_mtime, str(device))
    with _BUILD_LOCK:
        if key not in _CACHE:
            state = _read_state_dict(path)
            tf_inception = _torch_fidelity_inception()
            tm_fid = _torchmetrics_fid()
            try:
                with _weights_from(tf_inception, state):
                    # antialias=False: torch-fidelity's TF-compatible resize, as the published FID numbers use.
                    net = tm_fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                                    feature_extractor_weights_path=None, antialias=False)
            except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
                raise ValueError(f"Inception weights file {path} is not an InceptionV3 FID state dict: "
                                 f"{str(e).splitlines()[0]}") from None
            net.num_features = int(feature)  # spares torchmetrics a dummy forward pass to find it
            _CACHE[key] = net.to(device)
        return _CACHE[key]


def to_uint8_rgb(x: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Images [B, C, H, W] (C = 1 or 3) in data_range -> uint8 [B, 3, H, W], as image files would store them."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [B, 1 or 3, H, W], got {tuple(x.shape)}")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise ValueError(f"data_range={data_range!r} must be (low, high) with high > low")
    scaled = ((x.detach().float() - lo) / (hi - lo) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return scaled.expand(-1, 3, -1, -1) if scaled.shape[1] == 1 else scaled


class InceptionFeatures:
    """A ModelSpec.features callable: images in data_range -> Inception pool features [B, F] (float32).

    The network is built on the first call (so a model spec can name it without the file being read), and runs
    in chunks of `batch_size` images because every image is resized to 299 x 299.
    """

    def __init__(self, weights_path: Optional[str | os.PathLike] = None,
                 data_range: tuple[float, float] = (-1.0, 1.0), batch_size: int = 32, feature: str = "2048",
                 device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be at least 1")
        self.weights_path, self.data_range = weights_path, data_range
        self.batch_size, self.feature = batch_size, feature
        self.device = torch.device(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        net = load_inception(self.weights_path, self.feature, self.device)
        images = to_uint8_rgb(x, self.data_range)
        with torch.no_grad():
            return torch.cat([net(images[i:i + self.batch_size].to(self.device)).float().cpu()
                              for i in range(0, len(images), self.batch_size)])


def fid_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    f64 = torch.float64
    return float(_torchmetrics_fid()._compute_fid(mu1.to(f64), sigma1.to(f64), mu2.to(f64), sigma2.to(f64)))


def frechet_inception_distance(real: torch.Tensor, fake: torch.Tensor,
                               weights_path: Optional[str | os.PathLike] = None,
                               data_range: tuple[float, float] = (-1.0, 1.0), batch_size: int = 32,
                               feature: nn.Module | str = "2048") -> float:
    """FID between two image batches [N, C, H, W] in data_range, computed by torchmetrics.

    `feature` may be a module taking uint8 [B, 3, H, W] (tests pass a small one); by default the local Inception.
    """
    for name, batch in (("real", real), ("fake", fake)):
        if batch.ndim != 4 or batch.shape[0] < 2:
            raise ValueError(f"{name} must be images [N >= 2, C, H, W], got shape {tuple(batch.shape)}")
    net = feature if isinstance(feature, nn.Module) else load_inception(weights_path, feature)
    metric = _torchmetrics_fid().FrechetInceptionDistance(feature=net, normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        rgb = to_uint8_rgb(images, data_range)
        for i in range(0, len(rgb), batch_size):
            metric.update(rgb[i:i + batch_size], real=is_real)
    return float(metric.compute())
