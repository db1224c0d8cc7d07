"""The registry file: its format, the checked `LocalModelEntry`, and reading a file into model factories."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ... import processes
from ..guidance import check_guidance

if TYPE_CHECKING:
    from ..base import ModelSpec

__all__ = ["KINDS", "FIELDS", "NETWORK_ONLY_FIELDS", "PIPELINE_ONLY_FIELDS", "DTYPES", "PREDICTION_TYPES",
           "TIME_INPUTS", "PICKLED_SUFFIXES", "LocalModelEntry", "parse_registry", "load_registry_file"]

KINDS = ("diffusers-unet", "torchscript", "entrypoint", "diffusers-pipeline")
# Accepted spellings -> the adapter in s3search.denoisers.
PREDICTION_TYPES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0",
                    "sample": "x0", "flow": "flow"}
# What the network receives as its time input: auto = the discrete step index on vp-discrete, else t.
TIME_INPUTS = ("auto", "t", "t*1000", "step", "sigma")
FIELDS = ("name", "kind", "path", "process", "prediction_type", "time_input", "shape", "data_range",
          "guidance_scale", "class_label", "null_label", "reference", "features", "inception_weights",
          "metric", "description", "options", "device", "expose_process", "height", "width", "prompt",
          "negative_prompt", "true_cfg_scale", "max_sequence_length", "dtype", "batch_size", "variant",
          "prompts", "reference_stats", "clip", "config")
# A pipeline reads its process, prediction type, time input and latent shape from its own folder, and has no
# class labels; these fields belong to the other kinds. Its FID features are always Inception's (on the decoded
# images, against reference_stats), so inception_weights applies to both.
NETWORK_ONLY_FIELDS = ("process", "prediction_type", "time_input", "shape", "data_range", "class_label",
                       "null_label", "reference", "features", "options")
PIPELINE_ONLY_FIELDS = ("height", "width", "prompt", "negative_prompt", "true_cfg_scale", "max_sequence_length",
                        "dtype", "batch_size", "variant", "prompts", "reference_stats", "clip", "config")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LocalModelEntry:
    name: str
    kind: str
    path: str                                   # a filesystem path, or module:factory for entrypoint
    where: str                                  # "<file>: models.<name>", for error messages
    base_dir: Path
    process: Any = None                         # a process name or a scheduler-config table
    prediction_type: Optional[str] = None       # eps | v | x0 | flow
    time_input: str = "auto"
    shape: Optional[tuple[int, ...]] = None
    data_range: tuple[float, float] = (-1.0, 1.0)
    guidance_scale: Optional[float] = None
    class_label: Optional[int] = None
    null_label: Optional[int] = None
    reference: Optional[str] = None
    features: Optional[str] = None
    inception_weights: Optional[str] = None
    metric: Optional[str] = None
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    expose_process: Optional[str] = None        # the registered process schedules name (see noise.process_view)
    # kind diffusers-pipeline (see diffusers_pipeline.py); None takes the pipeline's own default
    height: Optional[int] = None                # pixels
    width: Optional[int] = None
    prompt: str = ""                            # the prompt of ModelSpec.denoiser
    negative_prompt: Optional[str] = None
    true_cfg_scale: Optional[float] = None      # FLUX
    max_sequence_length: Optional[int] = None   # SD3, FLUX
    dtype: str = "float32"
    batch_size: int = 8
    variant: Optional[str] = None               # e.g. fp16: loads *.fp16.safetensors
    prompts: dict[str, str] = field(default_factory=dict)   # prompt-set name -> .txt / .jsonl file; first: default
    reference_stats: Optional[str] = None       # fid: .npz of mu / sigma, or reference images (.npy / .npz)
    clip: Optional[str] = None                  # clip-score: a transformers CLIPModel folder
    config: Optional[str] = None                # with a single-file checkpoint in path: its diffusers config folder

    def err(self, field_name: str, message: str) -> str:
        return f"{self.where}.{field_name}: {message}"

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"model registry file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("the top level must be an object")
            return data
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"model registry file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    raise ValueError(f"model registry file {path} must end in .toml or .json")


def _entries(data: dict[str, Any], source: str) -> list[tuple[str, dict[str, Any]]]:
    models = data.get("models")
    if isinstance(models, dict):
        out = []
        for name, entry in models.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: models.{name} must be a table of fields")
            if "name" in entry and entry["name"] != name:
                raise ValueError(f"{source}: models.{name}.name={entry['name']!r} differs from its key")
            out.append((name, entry))
        return out
    if isinstance(models, list):
        out = []
        for i, entry in enumerate(models):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"{source}: models[{i}] must be an object with a string name")
            out.append((entry["name"], entry))
        return out
    raise ValueError(f"{source}: expected a 'models' table (TOML) or a 'models' object or list (JSON)")


def _typed(where: str, name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"{where}.{name}={value!r} must be {what}")
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{name}={value!r} must be {what}")
    return value


def _parse_entry(name: str, raw: dict[str, Any], source: str, base_dir: Path) -> LocalModelEntry:
    where = f"{source}: models.{name}"
    if not name or not isinstance(name, str):
        raise ValueError(f"{source}: a model name must be a non-empty string")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(FIELDS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind={kind!r} must be one of {', '.join(KINDS)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{where}.path={path!r} must be a non-empty string")
    if kind == "entrypoint" and (path.count(":") != 1 or not all(path.split(":"))):
        raise ValueError(f"{where}.path={path!r} must be 'package.module:factory'")
    if kind == "diffusers-pipeline":
        misplaced = [f for f in NETWORK_ONLY_FIELDS if f in raw]
        if misplaced:
            raise ValueError(f"{where}.{misplaced[0]} does not apply to kind=diffusers-pipeline (the pipeline "
                             "folder gives its process, prediction type and latent shape)")
    else:
        misplaced = [f for f in PIPELINE_ONLY_FIELDS if f in raw]
        if misplaced:
            raise ValueError(f"{where}.{misplaced[0]} applies to kind=diffusers-pipeline only")
    kw: dict[str, Any] = {}

    process = raw.get("process")
    if process is not None:
        if isinstance(process, str):
            if process not in processes.names():
                raise ValueError(f"{where}.process={process!r} must be one of {', '.join(processes.names())} "
                                 "or a scheduler-config table")
        elif not isinstance(process, dict):
            raise ValueError(f"{where}.process={process!r} must be a process name or a scheduler-config table")
        kw["process"] = process
    if "prediction_type" in raw:
        pt = raw["prediction_type"]
        if pt not in PREDICTION_TYPES:
            raise ValueError(f"{where}.prediction_type={pt!r} must be one of {', '.join(PREDICTION_TYPES)}")
        kw["prediction_type"] = PREDICTION_TYPES[pt]
    if kind == "torchscript":
        for required in ("process", "prediction_type"):
            if required not in raw:
                raise ValueError(f"{where}.{required} is required for kind=torchscript")
    if "time_input" in raw:
        if raw["time_input"] not in TIME_INPUTS:
            raise ValueError(f"{where}.time_input={raw['time_input']!r} must be one of {', '.join(TIME_INPUTS)}")
        kw["time_input"] = raw["time_input"]
    if "shape" in raw:
        shape = raw["shape"]
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ValueError(f"{where}.shape={shape!r} must be a list of positive integers")
        kw["shape"] = tuple(shape)
    elif kind not in ("diffusers-unet", "diffusers-pipeline"):
        raise ValueError(f"{where}.shape is required for kind={kind} (one sample, e.g. [3, 32, 32])")
    if "data_range" in raw:
        dr = raw["data_range"]
        if (not isinstance(dr, list) or len(dr) != 2 or not all(isinstance(v, (int, float)) and
                                                                 not isinstance(v, bool) for v in dr)
                or not dr[1] > dr[0]):
            raise ValueError(f"{where}.data_range={dr!r} must be [low, high] with high > low")
        kw["data_range"] = (float(dr[0]), float(dr[1]))
    if "guidance_scale" in raw:
        try:
            kw["guidance_scale"] = check_guidance(raw["guidance_scale"], f"{where}.guidance_scale")
        except ValueError as e:
            raise ValueError(str(e)) from None
    for label in ("class_label", "null_label"):
        if label in raw:
            v = raw[label]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.{label}={v!r} must be a non-negative integer")
            kw[label] = v
    if "guidance_scale" in kw and kind != "diffusers-pipeline":
        if "class_label" not in kw:
            raise ValueError(f"{where}.class_label is required with guidance_scale")
        if kind != "entrypoint" and "null_label" not in kw and kw["guidance_scale"] != 1.0:
            raise ValueError(f"{where}.null_label (the unconditional class index) is required with "
                             "guidance_scale != 1")
    for text in ("reference", "features", "inception_weights", "metric", "description", "device",
                 "expose_process"):
        if text in raw:
            kw[text] = _typed(where, text, raw[text], str, "a string")
    if "features" in kw and kw["features"] not in ("inception", "digits", "none") and kw["features"].count(":") != 1:
        raise ValueError(f"{where}.features={kw['features']!r} must be inception, digits, none or "
                         "'package.module:factory'")
    if "expose_process" in kw and kw["expose_process"] not in processes.names():
        raise ValueError(f"{where}.expose_process={kw['expose_process']!r} must be one of "
                         f"{', '.join(processes.names())}")
    if "options" in raw:
        kw["options"] = dict(_typed(where, "options", raw["options"], dict, "a table of keyword arguments"))
    if kind == "diffusers-pipeline":
        kw.update(_pipeline_fields(where, raw))
    return LocalModelEntry(name=name, kind=kind, path=path, where=where, base_dir=base_dir, **kw)


def _positive_int(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}.{name}={value!r} must be a positive integer")
    return value


def _prompt_files(where: str, value: Any) -> dict[str, str]:
    """`prompts = "captions.txt"` (one set, named after the file) or a table of named sets; the first is the
    default. Set names are what a job may name, so they follow the job's name pattern."""
    if isinstance(value, str) and value.strip():
        files = {Path(value).stem: value}
    elif isinstance(value, dict) and value and all(isinstance(v, str) and v.strip() for v in value.values()):
        files = dict(value)
    else:
        raise ValueError(f"{where}.prompts={value!r} must be a prompt file (.txt / .jsonl) or a table of "
                         "name = file")
    bad = [n for n in files if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}", n)]
    if bad:
        raise ValueError(f"{where}.prompts: set name {bad[0]!r} must be letters, digits and ._:+- "
                         "(it is what a job names)")
    return files


def _pipeline_fields(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": raw.get("device", "auto")}
    for name in ("height", "width", "batch_size", "max_sequence_length"):
        if name in raw:
            kw[name] = _positive_int(where, name, raw[name])
    for name in ("prompt", "negative_prompt"):
        if name in raw:
            kw[name] = _typed(where, name, raw[name], str, "a string")
    if "prompts" in raw:
        kw["prompts"] = _prompt_files(where, raw["prompts"])
    for name in ("reference_stats", "clip"):
        if name in raw:
            value = _typed(where, name, raw[name], str, "a path (a string)")
            if not value.strip():
                raise ValueError(f"{where}.{name} must be a non-empty path")
            kw[name] = value
    if "inception_weights" in raw and "reference_stats" not in raw:
        raise ValueError(f"{where}.inception_weights is used by fid, which needs reference_stats as well")
    if "true_cfg_scale" in raw:
        kw["true_cfg_scale"] = check_guidance(raw["true_cfg_scale"], f"{where}.true_cfg_scale")
    if "dtype" in raw:
        if raw["dtype"] not in DTYPES:
            raise ValueError(f"{where}.dtype={raw['dtype']!r} must be one of {', '.join(DTYPES)}")
        kw["dtype"] = raw["dtype"]
    if "variant" in raw:
        variant = raw["variant"]
        if not isinstance(variant, str) or not variant or not all(c.isalnum() or c == "_" for c in variant):
            raise ValueError(f"{where}.variant={variant!r} must be a variant name such as fp16 (the part of "
                             "'*.fp16.safetensors' between the dots)")
        kw["variant"] = variant
    kw.update(_single_file_fields(where, raw))
    return kw


# Weights loaded with torch.load, which can run code; from_single_file would read them, so they are refused.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _single_file_fields(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    """`path` a single-file checkpoint (.safetensors) with `config` its diffusers config folder, or neither: the
    file name decides, so a pickled checkpoint is refused before anything is read."""
    path = str(raw["path"])
    suffix = Path(path).suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise ValueError(f"{where}.path={path!r} is a pickled checkpoint ({suffix}), which is never loaded (it can "
                         "run code); convert it to .safetensors and set config to its diffusers config folder")
    if "config" not in raw:
        if suffix == ".safetensors":
            raise ValueError(f"{where}.config is required with the single-file checkpoint {path!r}: a diffusers "
                             "config folder (model_index.json and the component configs, no weights needed)")
        return {}
    config = _typed(where, "config", raw["config"], str, "a path (a string)")
    if not config.strip():
        raise ValueError(f"{where}.config must be a non-empty path")
    if suffix != ".safetensors":
        raise ValueError(f"{where}.path={path!r} must be a .safetensors single-file checkpoint when config is set "
                         "(a pipeline folder needs no config)")
    if "variant" in raw:
        raise ValueError(f"{where}.variant applies to pipeline folders; a single-file checkpoint has one set of "
                         "weights")
    return {"config": config}


def parse_registry(path: str | Path) -> list[LocalModelEntry]:
    """Read and check a registry file; nothing is loaded yet."""
    path = Path(path).expanduser()
    data = _read_file(path)
    seen: set[str] = set()
    out = []
    for name, raw in _entries(data, str(path)):
        if name in seen:
            raise ValueError(f"{path}: model name {name!r} appears twice")
        seen.add(name)
        out.append(_parse_entry(name, raw, str(path), path.resolve().parent))
    return out


def load_registry_file(path: str | Path) -> dict[str, Callable[[], ModelSpec]]:
    """name -> factory building the ModelSpec on first use (weights are read then, not now)."""
    from .build import build_model  # here: building needs every kind's module, parsing none of them

    return {entry.name: (lambda e=entry: build_model(e)) for entry in parse_registry(path)}
