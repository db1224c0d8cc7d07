"""Models from a local path, named in a server-side registry file (TOML or JSON), never in a request.

    [models.cifar10-ddpm]                  # TOML: one table per model, keyed by name
    kind = "diffusers-unet"                # diffusers-unet | torchscript | entrypoint
    path = "/models/ddpm-cifar10"          # relative paths are relative to the registry file
    reference = "/data/cifar10-50k.npy"    # optional: [N, *shape] images (uint8 0..255 or floats in data_range)
    features = "inception"                 # optional: inception | digits | "module:factory"

JSON holds the same entries as {"models": {name: {...}}} or {"models": [{"name": ..., ...}]}. The fields are
listed in `FIELDS`; docs/models-local.md describes each. The file is parsed and checked when read (unknown
kinds, fields or values raise ValueError naming file, entry and field); weights are loaded on first use of a
model, when a missing path raises FileNotFoundError naming the entry and field.

Kinds:
- diffusers-unet: a `UNet2DModel` directory (config.json + diffusion_pytorch_model.safetensors, or a pipeline
  directory with unet/ and scheduler/). `scheduler_config.json` gives the betas (-> VPDiscrete) and the
  prediction type (epsilon / v_prediction / sample); the network gets the discrete step index.
- torchscript: a `torch.jit.save` file computing net(x, time_input) or, for conditional models,
  net(x, time_input, class_labels); `process` and `prediction_type` are required.
- entrypoint: "package.module:factory"; factory(**options) returns a `Denoiser` (or a ModelSpec). For guidance
  it is called as factory(class_label=..., **options) for the conditional and unconditional denoisers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import denoisers, processes
from ..denoisers import Denoiser
from .base import ModelSpec
from .guidance import cfg, check_guidance, conditional_net, guided_net

__all__ = ["KINDS", "FIELDS", "PREDICTION_TYPES", "TIME_INPUTS", "LocalModelEntry", "load_registry_file",
           "parse_registry", "process_from_scheduler_config", "build_model"]

KINDS = ("diffusers-unet", "torchscript", "entrypoint")
# Accepted spellings -> the adapter in s3search.denoisers.
PREDICTION_TYPES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0",
                    "sample": "x0", "flow": "flow"}
# What the network receives as its time input: auto = the discrete step index on vp-discrete, else t.
TIME_INPUTS = ("auto", "t", "t*1000", "step", "sigma")
FIELDS = ("name", "kind", "path", "process", "prediction_type", "time_input", "shape", "data_range",
          "guidance_scale", "class_label", "null_label", "reference", "features", "inception_weights",
          "metric", "description", "options", "device", "expose_process")
_ADAPTERS = {"eps": denoisers.from_eps, "v": denoisers.from_v, "x0": denoisers.from_x0,
             "flow": denoisers.from_flow}


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
    expose_process: Optional[str] = None        # the registered process schedules name (see process_view)

    def err(self, field_name: str, message: str) -> str:
        return f"{self.where}.{field_name}: {message}"

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# ----- parsing ------------------------------------------------------------------------------------------
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
    elif kind != "diffusers-unet":
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
    if "guidance_scale" in kw:
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
    return LocalModelEntry(name=name, kind=kind, path=path, where=where, base_dir=base_dir, **kw)


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
    return {entry.name: (lambda e=entry: build_model(e)) for entry in parse_registry(path)}


# ----- processes and time inputs -------------------------------------------------------------------------
def process_from_scheduler_config(config: dict[str, Any], where: str = "scheduler") -> processes.VPDiscrete:
    """The VPDiscrete process of a diffusers scheduler config, with betas computed by diffusers itself."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
    if kwargs.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr=true gives alpha = 0 at the last step, which no "
                         "logSNR-based sampler can start from; not supported")
    try:
        betas = DDPMScheduler(**kwargs).betas.double().tolist()
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: unsupported noise schedule {kwargs}: {e}") from None
    if not all(0.0 < b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must lie in (0, 1)")
    return processes.VPDiscrete(betas=tuple(betas))


def process_view(denoiser: Denoiser, target: str | processes.NoiseProcess) -> Denoiser:
    """The same model on another process, matched by logSNR: x_src = (alpha_src / alpha_dst) x at equal lambda.

    Exact inside the source process's lambda range; outside it the source time is clamped to its end (a
    discrete model has no noise levels beyond its first and last step).
    """
    src, dst = denoiser.process, processes.get(target)
    if src == dst:
        return denoiser

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        t_src = src.t_of_lambda(dst.lambda_(t))
        t_src = min(max(t_src, src.t_min), src.t_max)
        return denoiser(x * (src.alpha(t_src) / dst.alpha(t)), t_src)

    return Denoiser(fn=fn, process=dst, data_mean=denoiser.data_mean, name=denoiser.name)


def _registered(denoiser: Denoiser, entry: LocalModelEntry) -> tuple[Denoiser, str]:
    """Put the denoiser on a registered process, which is what schedules can name.

    A diffusers model with the default DDPM betas is the registered vp-discrete process up to the float32
    rounding of its betas; any other beta schedule is exposed through `process_view` on expose_process (default
    edm), since a schedule can only name registered processes.
    """
    proc = denoiser.process
    if entry.expose_process is None and proc.name in processes.names():
        registered = processes.get(proc.name)
        same = registered == proc
        if not same and isinstance(proc, processes.VPDiscrete) and len(proc.betas) == len(registered.betas):
            same = bool(np.allclose(proc.betas, registered.betas, rtol=1e-6, atol=0.0))
        if same:
            denoiser.process = registered
            return denoiser, "as trained"
    target = entry.expose_process or "edm"
    note = (f"viewed on {target} from {proc.name} (sigma_ve {proc.sigma_ve(proc.t_min):.4g}.."
            f"{proc.sigma_ve(proc.t_max):.4g})")
    return process_view(denoiser, target), note


def _process(entry: LocalModelEntry, value: Any) -> processes.NoiseProcess:
    if isinstance(value, dict):
        return process_from_scheduler_config(value, f"{entry.where}.process")
    return processes.get(value)


def _time_map(entry: LocalModelEntry, proc: processes.NoiseProcess) -> Optional[Callable[[float], float]]:
    mode = entry.time_input
    if mode == "auto":
        return None  # the adapters give a discrete network its step index and others t
    if mode == "t":
        return lambda t: t
    if mode == "t*1000":
        return lambda t: 1000.0 * t
    if mode == "sigma":
        return proc.sigma_ve
    if not hasattr(proc, "model_time"):
        raise ValueError(entry.err("time_input", f"'step' needs a discrete process, not {proc.name}"))
    return proc.model_time


# ----- network kinds ---------------------------------------------------------------------------------------
def _device(entry: LocalModelEntry) -> torch.device:
    if entry.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(entry.device)
    except RuntimeError:
        raise ValueError(entry.err("device", f"{entry.device!r} is not a torch device")) from None


def _on_device(fn: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """Run the network on its device and hand the result back where the input lives, without gradients."""

    def wrapped(x: torch.Tensor, t_in: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = fn(x.to(device), t_in.to(device), *(lab.to(device) for lab in labels))
        return out.to(x.device)

    return wrapped


def _existing(entry: LocalModelEntry, field_name: str, value: str, want_dir: bool) -> Path:
    p = entry.resolve(value)
    if not p.exists():
        raise FileNotFoundError(entry.err(field_name, f"{p} does not exist"))
    if want_dir and not p.is_dir():
        raise ValueError(entry.err(field_name, f"{p} must be a directory (a diffusers UNet2DModel folder)"))
    if not want_dir and not p.is_file():
        raise ValueError(entry.err(field_name, f"{p} must be a file"))
    return p


def _read_json(entry: LocalModelEntry, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(entry.err("path", f"{path} is not valid JSON: {e}")) from None
    if not isinstance(data, dict):
        raise ValueError(entry.err("path", f"{path} must hold a JSON object"))
    return data


def _load_diffusers(entry: LocalModelEntry):
    from diffusers import UNet2DModel

    root = _existing(entry, "path", entry.path, want_dir=True)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(entry.err("path", f"{root} holds no config.json (nor unet/config.json)"))
    config = _read_json(entry, config_file)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(entry.err("path", f"{config_file} describes a {config.get('_class_name')}; only "
                                           "UNet2DModel (unconditional or class-conditional) is supported"))
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(entry.err("path", f"{unet_dir} holds no diffusion_pytorch_model.safetensors "
                                                  "(pickled .bin weights are not loaded)"))
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(entry.err("path", f"{unet_dir} could not be loaded as a UNet2DModel: {e}")) from None
    scheduler: dict[str, Any] = {}
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                      unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = _read_json(entry, candidate)
            break
    if entry.process is None and not scheduler:
        raise FileNotFoundError(entry.err("path", f"{root} holds no scheduler_config.json (nor "
                                                  "scheduler/scheduler_config.json) and the entry sets no process"))
    proc = _process(entry, entry.process) if entry.process is not None else \
        process_from_scheduler_config(scheduler, f"{entry.where}: {candidate}")
    pred = entry.prediction_type or PREDICTION_TYPES.get(scheduler.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(entry.err("prediction_type", f"scheduler prediction_type="
                                                      f"{scheduler.get('prediction_type')!r} is not supported"))
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = entry.shape or (unet.config.in_channels, *size)
    unet = unet.to(_device(entry)).eval().requires_grad_(False)
    in_ch = unet.config.in_channels

    def net(x: torch.Tensor, t_in: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = unet(x, t_in, class_labels=labels).sample
        return out[:, :in_ch]  # learned-variance models append the variance channels

    conditional = unet.config.num_class_embeds is not None or unet.config.class_embed_type is not None
    return _on_device(net, _device(entry)), proc, pred, shape, conditional


def _load_torchscript(entry: LocalModelEntry):
    path = _existing(entry, "path", entry.path, want_dir=False)
    try:
        module = torch.jit.load(str(path), map_location=_device(entry))
    except (RuntimeError, ValueError) as e:
        raise ValueError(entry.err("path", f"{path} is not a TorchScript file (torch.jit.save): "
                                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")) from None
    module.eval()
    conditional = entry.class_label is not None
    return _on_device(module, _device(entry)), _process(entry, entry.process), entry.prediction_type, \
        entry.shape, conditional


def _network_denoiser(entry: LocalModelEntry) -> tuple[Denoiser, tuple[int, ...]]:
    loader = _load_diffusers if entry.kind == "diffusers-unet" else _load_torchscript
    net, proc, pred, shape, conditional = loader(entry)
    if entry.class_label is not None and not conditional:
        raise ValueError(entry.err("class_label", "the network is not class-conditional"))
    if entry.class_label is None:
        net_fn = lambda x, t_in: net(x, t_in)  # noqa: E731
    elif entry.guidance_scale is None or entry.guidance_scale == 1.0:
        net_fn = conditional_net(net, entry.class_label)
    else:
        net_fn = guided_net(net, entry.class_label, entry.null_label, entry.guidance_scale)
    denoiser = _ADAPTERS[pred](net_fn, proc, time_map=_time_map(entry, proc))
    denoiser.name = entry.name
    return denoiser, tuple(shape)


def _entrypoint_denoiser(entry: LocalModelEntry) -> tuple[Denoiser, tuple[int, ...], Optional[ModelSpec]]:
    factory = _import(entry, "path", entry.path)

    def call(**extra: Any) -> Any:
        made = factory(**entry.options, **extra)
        if isinstance(made, ModelSpec):
            return made
        if not isinstance(made, Denoiser):
            raise ValueError(entry.err("path", f"{entry.path} returned {type(made).__name__}; a factory must "
                                               "return an s3search.denoisers.Denoiser or a ModelSpec"))
        return made

    if entry.class_label is None:
        made = call()
    else:
        cond = call(class_label=entry.class_label)
        if entry.guidance_scale is None or entry.guidance_scale == 1.0:
            made = cond
        else:
            uncond = call(class_label=entry.null_label)
            dc = cond.denoiser if isinstance(cond, ModelSpec) else cond
            du = uncond.denoiser if isinstance(uncond, ModelSpec) else uncond
            made = cfg(dc, du, entry.guidance_scale, name=entry.name)
    spec = made if isinstance(made, ModelSpec) else None
    denoiser = made.denoiser if spec is not None else made
    if entry.process is not None and _process(entry, entry.process) != denoiser.process:
        raise ValueError(entry.err("process", f"the entry says {entry.process!r}; the factory's denoiser is on "
                                              f"{denoiser.process.name}"))
    return denoiser, entry.shape or (spec.shape if spec else ()), spec


def _import(entry: LocalModelEntry, field_name: str, target: str) -> Callable[..., Any]:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(entry.err(field_name, f"cannot import module {module_name!r}: {e}")) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ValueError(entry.err(field_name, f"{module_name!r} has no callable {attr!r}"))
    return obj


# ----- reference data and features ---------------------------------------------------------------------------
def _load_reference(entry: LocalModelEntry, shape: tuple[int, ...]) -> torch.Tensor:
    path = _existing(entry, "reference", entry.reference, want_dir=False)
    try:
        if path.suffix == ".npy":
            array = np.load(str(path), allow_pickle=False)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1 and "images" not in tensors:
                raise ValueError(f"holds {sorted(tensors)}; expected one tensor or one named 'images'")
            array = tensors["images"] if "images" in tensors else next(iter(tensors.values()))
        else:
            raise ValueError("must be a .npy or .safetensors file")
    except ValueError as e:
        raise ValueError(entry.err("reference", f"{path}: {e}")) from None
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != tuple(shape) or array.shape[0] < 2:
        raise ValueError(entry.err("reference", f"{path} has shape {array.shape}; expected [N >= 2, "
                                                f"{', '.join(map(str, shape))}]"))
    lo, hi = entry.data_range
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0 * (hi - lo) + lo)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(entry.err("reference", f"{path} has dtype {array.dtype}; use uint8 or float"))
    return torch.from_numpy(array.astype(np.float32))


def _features(entry: LocalModelEntry) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if entry.features in (None, "none"):
        return None
    if entry.features == "inception":
        from ..metrics.fid import InceptionFeatures

        weights = str(entry.resolve(entry.inception_weights)) if entry.inception_weights else None
        return InceptionFeatures(weights, data_range=entry.data_range, device=_device(entry))
    if entry.features == "digits":
        from .digits_features import load_feature_fn

        return load_feature_fn()
    return _import(entry, "features", entry.features)()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hashes(entry: LocalModelEntry) -> dict[str, str]:
    """Weight and feature-network hashes: the keys under which cached reference statistics stay valid.

    An entry point's weights are unknown to us, so its reference statistics are recomputed rather than cached
    (unless the factory's own ModelSpec provides a weights_sha256).
    """
    out: dict[str, str] = {}
    if entry.kind == "torchscript":
        out["weights_sha256"] = _file_sha256(entry.resolve(entry.path))
    elif entry.kind == "diffusers-unet":
        root = entry.resolve(entry.path)
        unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
        digest = hashlib.sha256()
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            digest.update(_file_sha256(unet_dir / name).encode())
        out["weights_sha256"] = digest.hexdigest()
    if entry.features == "inception":
        from ..metrics.fid import resolve_weights_path

        try:
            weights = entry.resolve(entry.inception_weights) if entry.inception_weights else None
            out["features_sha256"] = _file_sha256(resolve_weights_path(weights))
        except FileNotFoundError:
            pass  # reported, with where to put the file, when the features are first computed
    elif entry.features == "digits":
        from .digits_features import FEATURES_FILE

        out["features_sha256"] = _file_sha256(FEATURES_FILE)
    return out


def build_model(entry: LocalModelEntry) -> ModelSpec:
    """Load the weights and assemble the ModelSpec for one registry entry."""
    spec: Optional[ModelSpec] = None
    if entry.kind == "entrypoint":
        denoiser, shape, spec = _entrypoint_denoiser(entry)
    else:
        denoiser, shape = _network_denoiser(entry)
    if not shape:
        raise ValueError(entry.err("shape", "is required: the factory returned no ModelSpec with a shape"))
    denoiser, process_note = _registered(denoiser, entry)
    reference_sampler = spec.reference_sampler if spec else None
    reference_set = spec.reference_set if spec else None
    if entry.reference is not None:
        real = _load_reference(entry, shape)
        denoiser.data_mean = real.mean(dim=0)

        def reference_sampler(n: int, generator: torch.Generator) -> torch.Tensor:
            return real[torch.randint(real.shape[0], (n,), generator=generator)].clone()

        def reference_set() -> torch.Tensor:
            return real.clone()

    features = _features(entry) if entry.features is not None else (spec.features if spec else None)
    metric = entry.metric or ("fd-features" if features is not None and reference_sampler is not None else "fd")
    provenance = {"registry_entry": entry.where, "kind": entry.kind, "path": entry.path,
                  "process": denoiser.process.name, "process_note": process_note}
    provenance.update(_hashes(entry))
    if entry.guidance_scale is not None:
        provenance.update(guidance_scale=str(entry.guidance_scale), class_label=str(entry.class_label))
    return ModelSpec(name=entry.name, denoiser=denoiser, shape=tuple(shape),
                     description=entry.description or (spec.description if spec else f"{entry.kind} {entry.path}"),
                     default_metric=metric, reference_sampler=reference_sampler, reference_set=reference_set,
                     features=features,
                     exact=spec.exact if spec else None,
                     provenance={**(spec.provenance if spec else {}), **provenance})
