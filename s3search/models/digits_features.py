"""The digits feature network: a small classifier whose penultimate layer is the digits analogue of Inception pool3.

Images in the digits model's range [-1, 1] ([B, 1, 8, 8] or [B, 64]) are clamped to that range first, as FID
quantises images to [0, 255]: out-of-range pixels are a sampler artefact the features should not extrapolate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["FEATURES_FILE", "FEATURE_DIM", "DigitsClassifier", "load_classifier", "load_feature_fn"]

FEATURES_FILE = Path(__file__).parent / "assets" / "digits_features.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """64 pixels -> 256 -> 64 (features) -> 10 classes."""

    def __init__(self, hidden: int = 256, feature_dim: int = FEATURE_DIM, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = {"hidden": hidden, "feature_dim": feature_dim, "dropout": dropout}
        self.body = nn.Sequential(
            nn.Linear(64, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, feature_dim), nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], 64).clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path = FEATURES_FILE) -> tuple[DigitsClassifier, dict]:
    from safetensors.torch import load_file

    from .digits import read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights not found at {path}; run bench/train_digits.py")
    meta = read_metadata(path)
    net = DigitsClassifier(**meta["config"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    net.eval().requires_grad_(False)
    return net, meta


def load_feature_fn(path: Path = FEATURES_FILE) -> Callable[[torch.Tensor], torch.Tensor]:
    """batch [B, 1, 8, 8] in [-1, 1] -> float32 features [B, 64]."""
    net, _ = load_classifier(path)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.features(x.float())

    return features
