"""Kind `torchscript`: a `torch.jit.save` file computing net(x, time_input) or net(x, time_input, class_labels)."""

from __future__ import annotations

import torch

from .common import device_of, existing, file_sha256, on_device
from .network import NetworkParts
from .noise import entry_process
from .registry_file import LocalModelEntry

__all__ = ["load", "weights_sha256"]


def load(entry: LocalModelEntry) -> NetworkParts:
    path = existing(entry, "path", entry.path, want_dir=False)
    try:
        module = torch.jit.load(str(path), map_location=device_of(entry))
    except (RuntimeError, ValueError) as e:
        raise ValueError(entry.err("path", f"{path} is not a TorchScript file (torch.jit.save): "
                                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")) from None
    module.eval()
    conditional = entry.class_label is not None
    return NetworkParts(on_device(module, device_of(entry)), entry_process(entry, entry.process),
                        entry.prediction_type, entry.shape, conditional)


def weights_sha256(entry: LocalModelEntry) -> str:
    return file_sha256(entry.resolve(entry.path))
