"""The built-in digits test bed: an EDM-preconditioned denoiser for scikit-learn's bundled 8x8 digits.

Why EDM preconditioning rather than a VP eps-network: with c_in, c_skip, c_out and c_noise (Karras et al. 2022)
the network's input and training target both have unit variance at every noise level, so a small MLP trained
for a few minutes on a CPU gives a usable D(x, sigma) from sigma = 0.002 to 80. An eps-network's x0 estimate
(x - sigma eps) / alpha multiplies its error by sigma / alpha at high noise, which is exactly where few-step
samplers take their first, largest step. The denoiser is exposed on the `edm` process (t = sigma); a VP view of
the same network is D_VP(x, t) = D_VE(x / alpha, sigma / alpha) (`vp_view`).

Data range: pixel values 0..16 are mapped to [-1, 1] (v / 8 - 1). The network is an MLP on the 64 pixels with
FiLM noise conditioning: one model call on a batch of 1000 images costs ~10-20 ms on one core.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import processes
from ..denoisers import Denoiser
from .base import ModelSpec

__all__ = [
    "ASSETS",
    "DENOISER_FILE",
    "PROVENANCE_FILE",
    "IMAGE_SHAPE",
    "DigitsNet",
    "load_digits_data",
    "to_model_range",
    "edm_denoise",
    "load_denoiser_net",
    "digits_denoiser",
    "vp_view",
    "builtin_models",
]

ASSETS = Path(__file__).parent / "assets"
DENOISER_FILE = ASSETS / "digits_denoiser.safetensors"
PROVENANCE_FILE = ASSETS / "digits_provenance.json"
IMAGE_SHAPE = (1, 8, 8)
PIXEL_MAX = 16


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (no download): uint8 images [1797, 8, 8] with values 0..16, and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def data_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 pixel values 0..16 -> float32 tensor [N, 1, 8, 8] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) / (PIXEL_MAX / 2) - 1.0
    return x.reshape(-1, *IMAGE_SHAPE)


class _Block(nn.Module):
    """Pre-norm residual MLP block with FiLM (scale, shift) from the noise embedding."""

    def __init__(self, width: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=-1)
        y = self.norm(h) * (1.0 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(y))))


class DigitsNet(nn.Module):
    """F(c_in x, c_noise): the raw network inside the EDM preconditioning. Input [B, 1, 8, 8] -> [B, 1, 8, 8]."""

    def __init__(self, width: int = 256, depth: int = 4, emb_dim: int = 64, n_freq: int = 16) -> None:
        super().__init__()
        self.config = {"width": width, "depth": depth, "emb_dim": emb_dim, "n_freq": n_freq}
        # Fixed geometric frequencies for c_noise = ln(sigma) / 4, which lies in about [-1.6, 1.1].
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), n_freq)), persistent=False)
        self.emb = nn.Sequential(nn.Linear(2 * n_freq, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(_Block(width, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.reshape(-1, 1) * self.freqs
        emb = self.emb(torch.cat([angles.sin(), angles.cos()], dim=-1))
        h = self.inp(x.reshape(x.shape[0], 64))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).reshape(x.shape)


def edm_denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); sigma is a tensor of shape [B] (Karras et al. 2022)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(s**2 + sigma_data**2)
    return c_skip * x + c_out * net(c_in * x, torch.log(sigma) / 4.0)


def read_metadata(path: Path) -> dict:
    """The JSON document a safetensors file written by bench/train_digits.py carries under "s3search"."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "s3search" not in meta:
        raise ValueError(f"{path} has no 's3search' metadata; it was not written by bench/train_digits.py")
    return json.loads(meta["s3search"])


def load_denoiser_net(path: Path = DENOISER_FILE) -> tuple[DigitsNet, dict]:
    """The committed network (weights stored as float16, run in float32) and its metadata (config, sigma_data)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits denoiser weights not found at {path}; run bench/train_digits.py")
    meta = read_metadata(path)
    net = DigitsNet(**meta["config"])
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    return net, meta


def digits_denoiser(net: nn.Module, sigma_data: float, data_mean: torch.Tensor | None = None,
                    name: str = "digits") -> Denoiser:
    """Wrap the network as a Denoiser on the EDM process: t is sigma, a Python float."""
    param = next(net.parameters())

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        with torch.no_grad():
            xin = x.to(param.dtype)
            sigma = torch.full((x.shape[0],), float(t), dtype=param.dtype, device=x.device)
            return edm_denoise(net, xin, sigma, sigma_data).to(x.dtype)

    return Denoiser(fn=fn, process=processes.get("edm"), data_mean=data_mean, name=name)


def vp_view(denoiser: Denoiser, process: str | processes.NoiseProcess = "vp-linear") -> Denoiser:
    """The same model on a VP process: D_VP(x, t) = D_VE(x / alpha_t, sigma_t / alpha_t) (docs/math.md §1)."""
    proc = processes.get(process)
    if proc.name == "edm":
        return denoiser

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        return denoiser(x / proc.alpha(t), proc.sigma_ve(t))

    return Denoiser(fn=fn, process=proc, data_mean=denoiser.data_mean, name=f"{denoiser.name}-{proc.name}")


@lru_cache(maxsize=1)
def _real_digits() -> torch.Tensor:
    images, _ = load_digits_data()
    return to_model_range(images)


def reference_sampler(n: int, generator: torch.Generator) -> torch.Tensor:
    """n real digits in [-1, 1], drawn uniformly with replacement (the data set has only 1797 images)."""
    if n < 1:
        raise ValueError(f"n={n!r} must be at least 1")
    real = _real_digits()
    index = torch.randint(real.shape[0], (n,), generator=generator)
    return real[index].clone()


def _provenance() -> dict[str, str]:
    if not PROVENANCE_FILE.is_file():
        return {}
    data = json.loads(PROVENANCE_FILE.read_text())
    return {k: str(v) for k, v in data.items() if not isinstance(v, (dict, list))}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_digits_spec() -> ModelSpec:
    from .digits_features import FEATURES_FILE, load_feature_fn

    net, meta = load_denoiser_net()
    real = _real_digits()
    data_mean = real.mean(dim=0)
    denoiser = digits_denoiser(net, float(meta["sigma_data"]), data_mean=data_mean)
    provenance = _provenance()
    provenance["weights_sha256"] = _sha256(DENOISER_FILE)
    provenance["features_sha256"] = _sha256(FEATURES_FILE)
    return ModelSpec(
        name="digits",
        denoiser=denoiser,
        shape=IMAGE_SHAPE,
        description="EDM-preconditioned MLP on scikit-learn's 8x8 digits (1797 images, pixels in [-1, 1]); "
                    "Frechet distance in the digits classifier's 64-d penultimate-layer features",
        default_metric="fd-features",
        reference_sampler=reference_sampler,
        reference_set=lambda: real.clone(),
        features=load_feature_fn(),
        provenance=provenance,
    )


def builtin_models() -> dict[str, Callable[[], ModelSpec]]:
    return {"digits": make_digits_spec}
