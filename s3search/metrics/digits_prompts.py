"""Prompt-following metrics of the text-to-image digits test beds (digits-t2i, digits-t2i-flow), read by the
project's digits classifier (s3search/models/assets/digits_features.safetensors) on the decoded 8x8 images:

- `prompt-accuracy`: the classifier's mean probability of the digit each row's prompt names, the CLIP score of
  this test bed. Registered as 1 - that probability, so lower is better like every other metric.
- `fd-per-digit`: a class-balanced feature FD. For each digit the prompts name, it is the Fréchet distance of that
  digit's samples to that digit's real images, in the classifier's 64 features. The value is the mean over
  digits, as a class-conditional FID is. The reference is all real images of each digit (sklearn's bundled set,
  about 180 a digit), the same for every split, so it is computed here once and not drawn per request.

A prompt names its digit by a numeral ("a bold 7") or a word ("the digit seven"), exactly once.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from . import frechet

__all__ = ["WORDS", "prompted_digit", "prompted_digits", "model_problem", "digit_probability",
           "prompt_accuracy_error", "fd_per_digit"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TOKEN = re.compile(r"\b(?:[0-9]|" + "|".join(WORDS) + r")\b", re.IGNORECASE)
IMAGE_SHAPE = (1, 8, 8)
MIN_ROWS_PER_DIGIT = 2     # a covariance needs two rows


def prompted_digit(prompt: str) -> int:
    """The digit `prompt` names; ValueError unless it names exactly one."""
    found = {m.group(0).lower() for m in _TOKEN.finditer(prompt)}
    digits = {int(t) if t.isdigit() else WORDS.index(t) for t in found}
    if len(digits) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one digit (0-9 or zero..nine) for the digits "
                         f"classifier to score it; it names {sorted(digits) or 'none'}")
    return digits.pop()


def prompted_digits(prompts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([prompted_digit(p) for p in prompts], dtype=torch.long)


def model_problem(metric: str, model) -> Optional[str]:
    """Why `model` (a text-to-image ModelSpec) is not a digits model these metrics can read, or None. Known without
    sampling: its images are 8 x 8 (the pipeline's height and width in its provenance) and every prompt of its
    prompt sets names one digit."""
    who = f"model={model.name!r}"
    size = (model.provenance.get("height"), model.provenance.get("width"))
    if size != ("8", "8"):
        return (f"metric={metric!r} reads images with the 8x8 digits classifier; {who} makes "
                f"{size[0]}x{size[1]} images (digits-t2i and digits-t2i-flow are 8x8)")
    for name, prompt_set in model.prompt_sets.items():
        for prompt in prompt_set.prompts:
            try:
                prompted_digit(prompt.text)
            except ValueError as e:
                return f"metric={metric!r} on {who}, prompt set {name!r}: {e}"
    return None


def _check_images(images: torch.Tensor) -> None:
    if tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"the digits classifier reads decoded images of shape {IMAGE_SHAPE} in [-1, 1]; got "
                         f"rows of shape {tuple(images.shape[1:])} (a digits text-to-image model is needed)")


@lru_cache(maxsize=1)
def _classifier():
    from ..models.digits_features import load_classifier

    return load_classifier()[0]


def digit_probability(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The classifier's probability, per row, of the digit the row's prompt names; float64 [N]."""
    _check_images(images)
    digits = prompted_digits(prompts)
    with torch.no_grad():
        prob = torch.cat([_classifier()(images[i:i + 1024].float()).softmax(1).double()
                          for i in range(0, len(images), 1024)])
    return prob[torch.arange(len(digits)), digits]


def prompt_accuracy_error(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """1 - mean probability of the prompted digit: 0 when every image is read as its prompt's digit."""
    return 1.0 - float(digit_probability(images, prompts).mean())


def _features(images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_classifier().features(images[i:i + 1024].float()).double()
                          for i in range(0, len(images), 1024)])


@lru_cache(maxsize=1)
def _real_stats() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Feature mean and covariance of every digit's real images."""
    from ..models.digits import load_digits_data, to_model_range

    images, labels = load_digits_data()
    feats = _features(to_model_range(images))
    return {d: frechet.gaussian_stats(feats[torch.as_tensor(labels == d)]) for d in range(10)}


def fd_per_digit(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean over the prompted digits of FD(that digit's samples, that digit's real images) in classifier features."""
    _check_images(images)
    digits = prompted_digits(prompts)
    feats = _features(images)
    real = _real_stats()
    values = []
    for d in sorted(set(digits.tolist())):
        rows = feats[digits == d]
        if len(rows) < MIN_ROWS_PER_DIGIT:
            raise ValueError(f"fd-per-digit needs at least {MIN_ROWS_PER_DIGIT} samples per prompted digit; digit "
                             f"{d} has {len(rows)} (use more samples)")
        values.append(frechet.frechet_distance_to_stats(rows, *real[d]))
    return float(np.mean(values))
