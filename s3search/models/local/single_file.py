"""Single-file checkpoints of kind `diffusers-pipeline`: one original-layout `.safetensors` file (as A1111,
ComfyUI and the model hubs ship SD 1.x and others), loaded with diffusers' `<Pipeline>.from_single_file`.

Offline, from_single_file needs the pipeline's diffusers configs: the entry's `config` folder (model_index.json,
each component's config, tokenizer and scheduler files; weights not needed). It names the pipeline class, which
must be one of `pipelines.FAMILIES`. Only safetensors are read: a pickled checkpoint is refused by name when the
registry is parsed, and a component folder of the config that holds only pickled weights is refused here, since
diffusers falls back to a component's folder when the checkpoint lacks that component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .common import existing
from .registry_file import PICKLED_SUFFIXES, LocalModelEntry

__all__ = ["checkpoint_file", "config_weights", "missing_weights", "check_class", "from_single_file"]


def checkpoint_file(entry: LocalModelEntry) -> Path:
    """The entry's checkpoint, checked to be an existing safetensors file (parsing checked the name already;
    this guards a file renamed or replaced since)."""
    path = existing(entry, "path", entry.path, want_dir=False)
    if path.suffix != ".safetensors":
        raise ValueError(entry.err("path", f"{path} must be a .safetensors single-file checkpoint"))
    return path


def config_weights(entry: LocalModelEntry, folder: Path) -> list[Path]:
    """The safetensors weights a config component folder holds ([] for the usual folder without weights).

    diffusers may load a component from its folder when the checkpoint lacks it, and a folder with only a
    pickled file would then be unpickled: such a folder is refused naming the file."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    pickled = [p for p in files if p.suffix in PICKLED_SUFFIXES]
    if pickled and not safetensors:
        raise FileNotFoundError(entry.err("config", f"{pickled[0]} is pickled weights, which are never loaded "
                                                    "(they can run code); delete it (the checkpoint holds the "
                                                    "weights) or convert it to .safetensors"))
    return safetensors


def missing_weights(pipe: Any, checkpoint: Path) -> list[str]:
    """'component.parameter' of every weight of a diffusers network (UNet, transformer, VAE) the checkpoint does
    not hold. With accelerate, diffusers leaves such a weight on the meta device; without it, randomly
    initialised, so the checkpoint is converted again with diffusers' own mapping to see which it held."""
    from diffusers.utils import is_accelerate_available

    out = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.named_parameters(), *component.named_buffers()]
            out += [f"{name}.{key}" for key, tensor in tensors if tensor.device.type == "meta"]
    if out or is_accelerate_available():
        return out
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    for name, component in sorted(pipe.components.items()):
        held = _converted_keys(component, state)
        if held is not None:
            out += [f"{name}.{key}" for key in component.state_dict() if key not in held]
    return out


def _converted_keys(component: Any, state: dict[str, torch.Tensor]) -> Optional[set[str]]:
    """The diffusers keys from_single_file makes of `state` for this component; None for a component that is
    not converted by a diffusers mapping (text encoders, tokenizers, the scheduler)."""
    # private to diffusers, but the very mapping from_single_file used; there is no public way to ask
    from diffusers.loaders import single_file_model as sfm

    mapping = sfm._get_single_file_loadable_mapping_class(type(component))
    if mapping is None:
        return None
    own = component.state_dict()
    if not sfm._should_convert_state_dict_to_diffusers(own, state):
        return set(state)
    convert = sfm.SINGLE_FILE_LOADABLE_CLASSES[mapping]["checkpoint_mapping_fn"]
    # the mappings pop keys as they rename them: each gets its own copy of the (shared) tensors
    return set(convert(config=dict(component.config), checkpoint=dict(state)))


def check_class(entry: LocalModelEntry, cls: Any) -> None:
    if not hasattr(cls, "from_single_file"):
        raise ValueError(entry.err("config", f"diffusers {cls.__name__} has no from_single_file; use a pipeline "
                                             "folder in `path` instead"))


def from_single_file(cls: Any, checkpoint: Path, config_root: Path, dtype: torch.dtype,
                     kwargs: dict[str, Any]) -> Any:
    """The pipeline read from `checkpoint` with the configs of `config_root`, offline."""
    return cls.from_single_file(str(checkpoint), config=str(config_root), local_files_only=True,
                                torch_dtype=dtype, **kwargs)
