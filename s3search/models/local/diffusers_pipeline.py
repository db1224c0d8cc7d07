"""Kind `diffusers-pipeline`: a text-to-image pipeline folder (model_index.json), loaded with diffusers' classes.

The folder is checked before anything is loaded: the pipeline class must be one of `pipelines.FAMILIES`, every
component the pipeline needs must be listed and present, and every model component must hold safetensors
weights (of the entry's `variant`, or plain); a pickled file (.bin, .pt, ...) is refused by name, since loading
it could run code. The safety checker, feature extractor and image encoder are never loaded. The ModelSpec's
`denoiser` is the model at the entry's `prompt`; `denoiser_for`, `decode` and `scheduler_times` come from
`s3search.models.pipelines`, put on a registered process as the diffusers-unet kind is (noise.registered).
The entry's `reference_stats` and `clip` (image_metrics) give it Inception features, a FID reference and a CLIP
model, checked before the pipeline is loaded. With `config` set, `path` is a single-file checkpoint read by
from_single_file with that folder's configs (single_file.py); the config folder is checked as a pipeline folder
is, except that its components need no weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ... import processes
from ...denoisers import Denoiser
from ..base import Conditions, ModelSpec
from ..pipelines import FAMILIES, PipelineModel, PipelineSettings, SizeError, pipeline_model
from ..prompts import PromptSet, load_prompt_set
from .common import device_of, existing, file_sha256, read_json
from .image_metrics import image_metric_parts
from .noise import exposure, registered, target_name
from . import single_file
from .registry_file import PICKLED_SUFFIXES, LocalModelEntry

__all__ = ["REQUIRED", "SKIPPED", "load", "build"]

# What each pipeline needs to turn prompts into latents and latents into images.
REQUIRED = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                  "scheduler"),
    "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                 "scheduler"),
    "FluxPipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                     "scheduler"),
}
# Components a sampler of latents never calls; they are passed as None so that nothing of theirs is read.
SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# name[.variant][-00001-of-00003].safetensors, as diffusers and transformers write weights and their shards
_SAFETENSORS = re.compile(r"^[^.]+(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.safetensors$")


def _index(entry: LocalModelEntry, field: str = "path") -> tuple[Path, dict[str, Any]]:
    """The pipeline folder (`path`) or a single file's config folder (`config`), and its model_index.json."""
    what, missing = (("a diffusers pipeline folder holding model_index.json",
                      "a pipeline folder as written by save_pretrained") if field == "path" else
                     ("the pipeline's diffusers config folder, holding model_index.json and the component configs",
                      "the config folder of a single-file checkpoint: the pipeline folder without its weights"))
    root = existing(entry, field, getattr(entry, field), want_dir=True, what_dir=what)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(entry.err(field, f"{root} holds no model_index.json ({missing})"))
    index = read_json(entry, index_file, field)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(entry.err(field, f"{index_file} names {name!r}; kind=diffusers-pipeline loads "
                                          f"{', '.join(FAMILIES)}"))
    return root, index


def _components(entry: LocalModelEntry, root: Path, index: dict[str, Any], field: str = "path") -> dict[str, Path]:
    """name -> folder of every component that will be loaded, after checking the required ones are there."""
    pipeline = index["_class_name"]
    listed = {k: v for k, v in index.items()
              if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and k not in SKIPPED}
    for name in REQUIRED[pipeline]:
        if name not in listed or listed[name][1] is None:
            raise ValueError(entry.err(field, f"{root / 'model_index.json'} lists no {name}; {pipeline} needs "
                                              f"its {name} to sample and decode from prompts"))
    out = {}
    for name, (_, cls) in sorted(listed.items()):
        if cls is None:
            continue  # an optional component saved as absent (SD3's text_encoder_3, ...)
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(entry.err(field, f"{folder} is missing (model_index.json lists {name} = "
                                                     f"{cls})"))
        out[name] = folder
    return out


def _weights(entry: LocalModelEntry, folder: Path) -> list[Path]:
    """The safetensors files of a model component that from_pretrained will read; [] for a tokenizer or scheduler."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = {p: m.group("variant") for p in files if (m := _SAFETENSORS.match(p.name))}
    chosen = [p for p, v in safetensors.items() if entry.variant is not None and v == entry.variant]
    plain = [p for p, v in safetensors.items() if v is None]
    if chosen or plain:
        return chosen or plain
    pickled = [p for p in files if p.suffix in PICKLED_SUFFIXES]
    variants = sorted({v for v in safetensors.values() if v is not None})
    if variants:
        raise FileNotFoundError(entry.err("variant", f"{folder} holds only {', '.join(variants)} variant weights "
                                                     f"({next(iter(safetensors)).name}); set variant = "
                                                     f"\"{variants[0]}\""))
    if pickled:
        raise FileNotFoundError(entry.err("path", f"{pickled[0]} is pickled weights, which are never loaded (they "
                                                  "can run code); convert the component to .safetensors"))
    if (folder / "config.json").is_file():
        raise FileNotFoundError(entry.err("path", f"{folder} holds a config.json but no .safetensors weights"))
    return []


@contextlib.contextmanager
def _libraries_quiet():
    """diffusers' and transformers' loading chatter off while a pipeline loads: warnings about optional packages
    s3search never uses (torchvision image processors, accelerate) and a progress bar per component would bury
    the search's own progress. Errors still show; the libraries' own settings come back afterwards."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    before = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def load(entry: LocalModelEntry) -> tuple[PipelineModel, list[Path]]:
    """The pipeline with its family adapter, and the files it was read from (for the weights hash)."""
    with _libraries_quiet():
        return _load(entry)


def _sources(entry: LocalModelEntry) -> tuple[Path, dict[str, Any], dict[str, Path], dict[str, list[Path]]]:
    """(config root, model_index, component folders, weights per folder): of the pipeline folder, or of the
    config folder of a single-file checkpoint, whose component folders need no weights."""
    if entry.config is None:
        root, index = _index(entry, "path")
        folders = _components(entry, root, index, "path")
        return root, index, folders, {name: _weights(entry, folder) for name, folder in folders.items()}
    root, index = _index(entry, "config")
    folders = _components(entry, root, index, "config")
    return root, index, folders, {name: single_file.config_weights(entry, folder)
                                  for name, folder in folders.items()}


def _init_kwargs(cls: Any, index: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {name: None for name in SKIPPED if name in params}
    # diffusers insists on every expected component; one saved as absent (SD3 without T5) is passed as None
    kwargs.update({name: None for name, value in index.items()
                   if name in params and isinstance(value, list) and len(value) == 2 and value[1] is None})
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False  # applied to decoded images by the pipeline's postprocessing, not here
    return kwargs


def _read_pipeline(entry: LocalModelEntry, cls: Any, root: Path, kwargs: dict[str, Any]) -> Any:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    checkpoint = None if entry.config is None else single_file.checkpoint_file(entry)
    source = f"{root}" if checkpoint is None else f"{checkpoint} (configs: {root})"
    if checkpoint is not None:
        single_file.check_class(entry, cls)
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; the old name works in every version >= 0.30
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            if checkpoint is not None:
                pipe = single_file.from_single_file(cls, checkpoint, root, _DTYPES[entry.dtype], kwargs)
            else:
                pipe = cls.from_pretrained(str(root), local_files_only=True, use_safetensors=True,
                                           torch_dtype=_DTYPES[entry.dtype], variant=entry.variant, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, SingleFileComponentError) as e:
        # diffusers' advice after the first line (pass the component in code) is no option of a registry entry
        detail = str(e).split("\n")[0] if isinstance(e, SingleFileComponentError) else str(e)
        raise ValueError(entry.err("path", f"{source} could not be loaded as a {cls.__name__}: {detail}")) from None
    missing = [] if checkpoint is None else single_file.missing_weights(pipe, checkpoint)
    if missing:
        raise ValueError(entry.err("path", f"{source}: the checkpoint lacks {len(missing)} weight(s) of the "
                                           f"{cls.__name__} (first: {missing[0]}); is it a {cls.__name__} "
                                           "checkpoint of the config's architecture?"))
    return pipe


def _load(entry: LocalModelEntry) -> tuple[PipelineModel, list[Path]]:
    import diffusers

    root, index, folders, weights = _sources(entry)
    cls = getattr(diffusers, index["_class_name"])
    pipe = _read_pipeline(entry, cls, root, _init_kwargs(cls, index)).to(device_of(entry))
    settings = PipelineSettings(height=entry.height, width=entry.width, guidance_scale=entry.guidance_scale,
                                negative_prompt=entry.negative_prompt,
                                true_cfg_scale=1.0 if entry.true_cfg_scale is None else entry.true_cfg_scale,
                                max_sequence_length=entry.max_sequence_length, batch_size=entry.batch_size,
                                prompt=entry.prompt)
    try:
        model = pipeline_model(pipe, settings)
    except SizeError as e:
        raise ValueError(entry.err("height", str(e))) from None
    except ValueError as e:
        raise ValueError(entry.err("path", f"{root}: {e}")) from None
    files = [root / "model_index.json"]
    if entry.config is not None:
        files.append(single_file.checkpoint_file(entry))
    for name, folder in folders.items():
        files += [p for p in sorted(folder.iterdir()) if p.is_file() and not _is_weights(p)] + weights[name]
    return model, files


def _is_weights(path: Path) -> bool:
    return path.suffix in PICKLED_SUFFIXES or path.name.endswith(".safetensors")


def _weights_sha256(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        # a single-file checkpoint lies outside its config folder: its name, so moving both keeps the hash
        digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _exposed_times(model: PipelineModel, target: processes.NoiseProcess) -> Callable[[int], list[float]]:
    src = model.process

    def times(n: int) -> list[float]:
        out = []
        for t in model.scheduler_times(n):
            t_dst = t if target == src else target.t_of_lambda(src.lambda_(min(max(t, src.t_min), src.t_max)))
            out.append(min(max(t_dst, target.t_min), target.t_max))
        return out

    return times


def _prompt_sets(entry: LocalModelEntry) -> dict[str, PromptSet]:
    out = {}
    for name, file in entry.prompts.items():
        try:
            out[name] = load_prompt_set(entry.resolve(file), name)
        except ValueError as e:
            raise ValueError(entry.err("prompts", str(e))) from None
    return out


def build(entry: LocalModelEntry) -> ModelSpec:
    image_metrics = image_metric_parts(entry)
    model, files = load(entry)
    same, process_note = exposure(model.process, entry)
    target = same if same is not None else processes.get(target_name(entry))

    def denoiser_for(conditions: Conditions) -> Denoiser:
        denoiser, _ = registered(model.denoiser_for(conditions), entry)
        denoiser.name = entry.name
        return denoiser

    default = Conditions((entry.prompt,))
    held: list[Optional[Denoiser]] = [None]

    def at_default_prompt(x: torch.Tensor, t: float) -> torch.Tensor:
        if held[0] is None:  # on first use, so that building the spec encodes no prompt
            held[0] = denoiser_for(default)
        return held[0](x, t)

    root = files[0].parent
    pipeline = type(model.pipe).__name__
    provenance = {"registry_entry": entry.where, "kind": entry.kind, "path": entry.path, "pipeline": pipeline,
                  **({"config": entry.config} if entry.config is not None else {}),
                  "process": target.name, "process_note": process_note,
                  "weights_sha256": _weights_sha256(root, files), "dtype": entry.dtype,
                  "variant": entry.variant or "", "height": str(model.height), "width": str(model.width),
                  "prompt": entry.prompt, "negative_prompt": "" if entry.negative_prompt is None
                  else entry.negative_prompt, "guidance_scale": str(model.guidance(default))}
    if isinstance(model, FAMILIES["FluxPipeline"]):
        provenance["true_cfg_scale"] = str(model.settings.true_cfg_scale)
    if model.shift_note():
        provenance["shift"] = model.shift_note()
    prompt_sets = _prompt_sets(entry)
    # The prompts decide the metric's value: caches keyed by the fingerprint must follow the files.
    provenance.update({f"prompts:{name}": ps.sha256 for name, ps in prompt_sets.items()})
    provenance.update(image_metrics.provenance)
    return ModelSpec(name=entry.name, denoiser=Denoiser(fn=at_default_prompt, process=target, name=entry.name),
                     shape=tuple(model.shape),
                     description=entry.description or f"{pipeline} {entry.path} at {model.height}x{model.width}",
                     default_metric=entry.metric or "trajectory", provenance=provenance,
                     denoiser_for=denoiser_for, decode=model.decode,
                     scheduler_times=_exposed_times(model, target), prompt_sets=prompt_sets,
                     default_prompt_set=next(iter(prompt_sets), None), features=image_metrics.features,
                     image_reference=image_metrics.image_reference, clip=image_metrics.clip)
