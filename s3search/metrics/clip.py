"""CLIP score of images against their prompts, with a transformers CLIPModel from a local folder.

The score is torchmetrics' CLIPScore: max(100 · mean_i cos(E_image_i, E_text_i), 0), the mean over rows clamped
once (not each row). torchmetrics' class itself is not used: it loads only hub names (a local folder is refused
unless wrapped in a callable) and, with transformers >= 5, fails on the model output `get_image_features` now
returns. Images go through the folder's CLIPProcessor as torchmetrics hands them over (uint8 [3, H, W] tensors:
resize, centre crop, rescale, normalise); prompts are tokenised with padding and truncated to the text encoder's
length, keeping the end-of-text token CLIP pools on.

Nothing is downloaded (`local_files_only`), only safetensors weights are read, and the model is loaded on first
use and kept per (folder, device).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from .fid import to_uint8_rgb

__all__ = ["CLIPScorer", "check_clip_folder", "clip_score_from_embeddings"]

_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def check_clip_folder(folder: str | Path) -> None:
    """ValueError naming what is missing unless `folder` holds a CLIPModel (safetensors) and its processor."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'} (a transformers "
                         "CLIPModel folder: config.json, model.safetensors, tokenizer and preprocessor files)")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{config} is missing or not a JSON object ({e})") from None
    if model_type != "clip":
        raise ValueError(f"{config} describes model_type={model_type!r}; the CLIP score needs a CLIPModel ('clip')")
    files = [p for p in folder.iterdir() if p.is_file()]
    if not any(p.name.endswith(".safetensors") for p in files):
        pickled = [p.name for p in files if p.suffix in _PICKLED]
        raise ValueError(f"{folder} holds no .safetensors weights" + (
            f" ({pickled[0]} is pickled, which is never loaded: it can run code)" if pickled else ""))
    _processor(folder)


def _processor(folder: Path) -> Any:
    from transformers import CLIPProcessor

    try:
        return CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{folder}: no CLIPProcessor (tokenizer and image processor) could be loaded: {e}") from None


def _load(folder: Path, device: torch.device) -> tuple[Any, Any]:
    key = (str(folder.resolve()), str(device))
    with _LOCK:
        if key not in _CACHE:
            from transformers import CLIPModel

            try:
                model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"{folder} could not be loaded as a CLIPModel: {e}") from None
            # float32 whatever the checkpoint stores: the score is a mean of cosines and should not depend on it
            _CACHE[key] = (model.float().to(device).eval().requires_grad_(False), _processor(folder))
        return _CACHE[key]


def _embedding(out: Any) -> torch.Tensor:
    # transformers >= 5 returns the model output with the projected embedding as pooler_output; 4.x the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score_from_embeddings(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """100 · cos(image_i, text_i) per row, float64."""
    image, text = image.to(torch.float64), text.to(torch.float64)
    return 100.0 * (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)


class CLIPScorer:
    """A ModelSpec.clip: images [B, 3, H, W] in data_range and one prompt a row -> the CLIP score."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 32,
                 data_range: tuple[float, float] = (-1.0, 1.0)):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be at least 1")
        self.folder, self.device = Path(folder), torch.device(device)
        self.batch_size, self.data_range = batch_size, data_range

    def row_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 · cos(E_image, E_text) of each row with its prompt, float64 [B] (not clamped)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts: the CLIP score needs one prompt a row")
        model, processor = _load(self.folder, self.device)
        rgb = to_uint8_rgb(images, self.data_range)
        length = model.config.text_config.max_position_embeddings
        out = []
        with torch.no_grad():
            for i in range(0, len(rgb), self.batch_size):
                pixels = processor.image_processor(images=list(rgb[i:i + self.batch_size]),
                                                   return_tensors="pt")["pixel_values"]
                tokens = processor.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                             max_length=length, return_tensors="pt")
                image = _embedding(model.get_image_features(pixel_values=pixels.to(self.device)))
                text = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                          attention_mask=tokens["attention_mask"].to(self.device)))
                out.append(clip_score_from_embeddings(image, text).cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """torchmetrics' CLIPScore: the mean of the row scores, clamped at 0."""
        return max(float(self.row_scores(images, prompts).mean()), 0.0)
