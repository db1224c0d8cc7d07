"""Kind `diffusers-unet`: a diffusers `UNet2DModel` folder (or a pipeline folder with unet/ and scheduler/)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import torch

from .common import device_of, existing, file_sha256, on_device, read_json
from .network import NetworkParts
from .noise import entry_process, process_from_scheduler_config
from .registry_file import PREDICTION_TYPES, LocalModelEntry

__all__ = ["load", "weights_sha256"]

_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _unet_dir(root: Path) -> Path:
    return root / "unet" if (root / "unet" / "config.json").is_file() else root


def load(entry: LocalModelEntry) -> NetworkParts:
    from diffusers import UNet2DModel

    root = existing(entry, "path", entry.path, want_dir=True)
    unet_dir = _unet_dir(root)
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(entry.err("path", f"{root} holds no config.json (nor unet/config.json)"))
    config = read_json(entry, config_file)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(entry.err("path", f"{config_file} describes a {config.get('_class_name')}; only "
                                           "UNet2DModel (unconditional or class-conditional) is supported"))
    if not (unet_dir / _WEIGHTS).is_file():
        raise FileNotFoundError(entry.err("path", f"{unet_dir} holds no {_WEIGHTS} "
                                                  "(pickled .bin weights are not loaded)"))
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(entry.err("path", f"{unet_dir} could not be loaded as a UNet2DModel: {e}")) from None
    scheduler: dict[str, Any] = {}
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = read_json(entry, candidate)
            break
    if entry.process is None and not scheduler:
        raise FileNotFoundError(entry.err("path", f"{root} holds no scheduler_config.json (nor "
                                                  "scheduler/scheduler_config.json) and the entry sets no process"))
    proc = entry_process(entry, entry.process) if entry.process is not None else \
        process_from_scheduler_config(scheduler, f"{entry.where}: {candidate}")
    pred = entry.prediction_type or PREDICTION_TYPES.get(scheduler.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(entry.err("prediction_type", f"scheduler prediction_type="
                                                      f"{scheduler.get('prediction_type')!r} is not supported"))
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = entry.shape or (unet.config.in_channels, *size)
    unet = unet.to(device_of(entry)).eval().requires_grad_(False)
    in_ch = unet.config.in_channels

    def net(x: torch.Tensor, t_in: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = unet(x, t_in, class_labels=labels).sample
        return out[:, :in_ch]  # learned-variance models append the variance channels

    conditional = unet.config.num_class_embeds is not None or unet.config.class_embed_type is not None
    return NetworkParts(on_device(net, device_of(entry)), proc, pred, tuple(shape), conditional)


def weights_sha256(entry: LocalModelEntry) -> str:
    unet_dir = _unet_dir(entry.resolve(entry.path))
    digest = hashlib.sha256()
    for name in ("config.json", _WEIGHTS):
        digest.update(file_sha256(unet_dir / name).encode())
    return digest.hexdigest()
