"""Models from a local path, named in a server-side registry file (TOML or JSON), never in a request.

    [models.cifar10-ddpm]                  # TOML: one table per model, keyed by name
    kind = "diffusers-unet"                # diffusers-unet | torchscript | entrypoint | diffusers-pipeline
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
- diffusers-pipeline: a text-to-image pipeline folder (model_index.json: SD 1.x/2.x, SDXL, SD3, FLUX); the
  ModelSpec is text-conditioned (`denoiser_for`, `decode`, `scheduler_times`; see s3search.models.pipelines).

The package is split by job: `registry_file` (the format, `LocalModelEntry`, parsing), `noise` (processes and
time inputs), `common` (paths, device, reference data, features, hashes), one module per kind
(`diffusers_unet`, `torchscript`, `entrypoint`, `diffusers_pipeline`) and `build` (entry -> ModelSpec).
"""

from .build import build_model
from .noise import process_from_scheduler_config, process_view
from .registry_file import (FIELDS, KINDS, PREDICTION_TYPES, TIME_INPUTS, LocalModelEntry, load_registry_file,
                            parse_registry)

__all__ = ["KINDS", "FIELDS", "PREDICTION_TYPES", "TIME_INPUTS", "LocalModelEntry", "load_registry_file",
           "parse_registry", "process_from_scheduler_config", "process_view", "build_model"]
