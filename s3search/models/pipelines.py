"""Text-to-image diffusers pipelines as conditioned denoisers that compute what the pipeline computes per step.

One class per pipeline family: `StableDiffusionPipeline` (1.x / 2.x), `StableDiffusionXLPipeline`,
`StableDiffusion3Pipeline` and `FluxPipeline`. For a batch of prompts, `denoiser_for(conditions)` returns
D(x, t) = E[x0 | x_t] on latents, in the time of the model's own process:

- SD, SDXL: vp-discrete with the scheduler's betas; the UNet gets the (fractional) step index, its eps or v output
  (the scheduler's prediction_type) is converted to x0; SDXL adds the pooled text embeddings and add_time_ids.
- SD3, FLUX: flow, x_t = (1 - t) x0 + t eps with t the scheduler's sigma; the transformer gets 1000 t (FLUX:
  1000 t in its dtype, divided by 1000, as its pipeline passes it), FLUX also its guidance embedding, packed
  latents and image ids. The shift moves the times a schedule visits (`scheduler_times`), not D itself.

Classifier-free guidance combines the network outputs as each pipeline does (out_u + w (out_c - out_u) on one
doubled batch; FLUX's true CFG on two calls), which gives the same x0 as guiding x0, the conversion being affine.
Prompt embeddings come from the pipeline's own `encode_prompt` and are cached per prompt tuple.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from .. import denoisers, processes
from ..denoisers import Denoiser
from .base import Conditions

__all__ = ["FAMILIES", "SizeError", "PipelineSettings", "PipelineModel", "StableDiffusionModel",
           "StableDiffusionXLModel", "StableDiffusion3Model", "FluxModel", "pipeline_model"]

# Prompt tuples whose embeddings are kept; a search uses a few prompt sets, each encoded once.
_CACHE_SIZE = 16


class SizeError(ValueError):
    """A height or width the pipeline would refuse."""


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline's __call__ would be given besides prompts; None takes the pipeline's own default."""

    height: Optional[int] = None                # pixels
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    true_cfg_scale: float = 1.0                 # FLUX only
    max_sequence_length: Optional[int] = None   # SD3, FLUX: T5 tokens
    batch_size: int = 8                         # rows per network / VAE / text-encoder call
    prompt: str = ""                            # the prompt of ModelSpec.denoiser


@dataclass
class _Embeddings:
    rows: dict[str, torch.Tensor]               # [n_prompts, ...] each
    shared: dict[str, torch.Tensor] = field(default_factory=dict)   # the same for every row (FLUX text ids)

    @property
    def n(self) -> int:
        return next(iter(self.rows.values())).shape[0]


class PipelineModel:
    """A loaded pipeline: latent shape, process, conditioned denoisers, VAE decoding, the shipped schedule."""

    network_name: ClassVar[str] = "unet"
    size_multiple: ClassVar[int] = 8            # what the pipeline's check_inputs requires of height and width

    def __init__(self, pipe: Any, settings: PipelineSettings):
        self.pipe = pipe
        self.settings = settings
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # from_pretrained does this; a pipeline built in code may still have dropout on
        self.network = getattr(pipe, self.network_name)
        self.device = next(self.network.parameters()).device
        self.dtype = self.network.dtype
        self.height, self.width = self._size()
        self.shape = self._latent_shape()
        self.process = self._process()
        self._cache: OrderedDict[tuple, _Embeddings] = OrderedDict()
        self._lock = threading.Lock()
        pipe.set_progress_bar_config(disable=True)

    # ----- what each family defines -----
    def _process(self) -> processes.NoiseProcess:
        raise NotImplementedError

    def _latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _multiple(self) -> int:
        return self.size_multiple

    def _cfg(self, conditions: Conditions) -> bool:
        return self.guidance(conditions) > 1.0

    def _encode(self, prompts: list[str], negatives: Optional[list[str]], cfg: bool) -> _Embeddings:
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, t_in: torch.Tensor, rows: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor], conditions: Conditions) -> torch.Tensor:
        raise NotImplementedError

    def _adapter(self, net: denoisers.NetFn) -> Denoiser:
        raise NotImplementedError

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE decoder takes them (the pipeline's step before vae.decode)."""
        return latents / self.pipe.vae.config.scaling_factor

    def _native_times(self, n: int) -> list[float]:
        raise NotImplementedError

    def shift_note(self) -> str:
        return ""

    # ----- shared -----
    def _call_default(self, name: str) -> Any:
        return inspect.signature(type(self.pipe).__call__).parameters[name].default

    def _size(self) -> tuple[int, int]:
        default = (getattr(self.pipe, "default_sample_size", None) or self.network.config.sample_size) * \
            self.pipe.vae_scale_factor
        height, width = self.settings.height or default, self.settings.width or default
        m = self._multiple()
        if height % m or width % m:
            raise SizeError(f"height={height} and width={width} must be multiples of {m} for "
                             f"{type(self.pipe).__name__}")
        return height, width

    def guidance(self, conditions: Conditions) -> float:
        g = conditions.guidance_scale if conditions.guidance_scale is not None else self.settings.guidance_scale
        return float(g if g is not None else self._call_default("guidance_scale"))

    def negatives(self, conditions: Conditions) -> Optional[list[str]]:
        if conditions.negative_prompts is not None:
            return list(conditions.negative_prompts)
        if self.settings.negative_prompt is not None:
            return [self.settings.negative_prompt] * len(conditions.prompts)
        return None  # the pipeline's default: "" or, for SDXL's force_zeros_for_empty_prompt, zero embeddings

    def embeddings(self, conditions: Conditions) -> _Embeddings:
        """The pipeline's prompt embeddings for these conditions, encoded once and kept (LRU)."""
        cfg = self._cfg(conditions)
        negatives = self.negatives(conditions) if cfg else None
        key = (conditions.prompts, tuple(negatives) if negatives is not None else None, cfg)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        bs = self.settings.batch_size
        parts = []
        with torch.no_grad():
            for i in range(0, len(conditions.prompts), bs):
                chunk_neg = negatives[i:i + bs] if negatives is not None else None
                parts.append(self._encode(list(conditions.prompts[i:i + bs]), chunk_neg, cfg))
        emb = _Embeddings(rows={k: torch.cat([p.rows[k] for p in parts]) for k in parts[0].rows},
                          shared=parts[0].shared)
        with self._lock:
            self._cache[key] = emb
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return emb

    def denoiser_for(self, conditions: Conditions) -> Denoiser:
        """D(x, t) on the model's process for these prompts; row r of x gets prompt r // (len(x) / n_prompts)."""
        emb = self.embeddings(conditions)

        def net(x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
            rows = x.shape[0]
            if rows % emb.n:
                raise ValueError(f"a batch of {rows} rows cannot be shared evenly between {emb.n} prompts")
            per_prompt = rows // emb.n
            outs = []
            with torch.no_grad():
                for i in range(0, rows, self.settings.batch_size):
                    j = min(i + self.settings.batch_size, rows)
                    idx = (torch.arange(i, j) // per_prompt).to(self.device)
                    chunk_rows = {k: v[idx] for k, v in emb.rows.items()}
                    out = self._forward(x[i:j].to(self.device, self.dtype), t_in[i:j].to(self.device),
                                        chunk_rows, emb.shared, conditions)
                    outs.append(out.to(x.device, x.dtype))
            return torch.cat(outs)

        denoiser = self._adapter(net)
        denoiser.name = type(self.pipe).__name__
        return denoiser

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *shape] -> images [B, 3, height, width] in [-1, 1], float32, where the latents were."""
        vae = self.pipe.vae
        vae_param = next(vae.parameters())
        outs = []
        with torch.no_grad():
            for chunk in latents.split(self.settings.batch_size):
                z = self._unscale(chunk.to(vae_param.device, vae_param.dtype))
                image = vae.decode(z, return_dict=False)[0]
                outs.append(image.float().clamp(-1.0, 1.0).to(latents.device))
        return torch.cat(outs)

    def scheduler_times(self, n: int) -> list[float]:
        """The times on `process` at which the pipeline's own scheduler calls the network in n steps."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be a positive number of steps")
        return self._native_times(n)

    def _fresh_scheduler(self) -> Any:
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)


# ----- Stable Diffusion 1.x / 2.x and SDXL: UNet, vp-discrete -------------------------------------------------
class StableDiffusionModel(PipelineModel):
    _PREDICTIONS = {"epsilon": denoisers.from_eps, "v_prediction": denoisers.from_v, "sample": denoisers.from_x0}

    def __init__(self, pipe: Any, settings: PipelineSettings):
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("unet.config.time_cond_proj_dim is set (a guidance-distilled / LCM UNet, sampled by "
                             "its own consistency scheduler); not supported")
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in self._PREDICTIONS:
            raise ValueError(f"scheduler prediction_type={prediction!r} is not one of "
                             f"{', '.join(self._PREDICTIONS)}")
        self.prediction_type = prediction
        super().__init__(pipe, settings)

    def _process(self) -> processes.NoiseProcess:
        from .local.noise import process_from_scheduler_config

        return process_from_scheduler_config(dict(self.pipe.scheduler.config), "scheduler/scheduler_config.json")

    def _latent_shape(self) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (self.network.config.in_channels, self.height // f, self.width // f)

    def _encode(self, prompts: list[str], negatives: Optional[list[str]], cfg: bool) -> _Embeddings:
        cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negatives)
        return _Embeddings(rows={"cond": cond, **({"uncond": uncond} if cfg else {})})

    def _added(self, rows: dict[str, torch.Tensor], cfg: bool) -> Optional[dict[str, torch.Tensor]]:
        return None

    def _forward(self, x: torch.Tensor, t_in: torch.Tensor, rows: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor], conditions: Conditions) -> torch.Tensor:
        cfg = "uncond" in rows
        t = t_in.to(torch.float32)
        hidden = torch.cat([rows["uncond"], rows["cond"]]) if cfg else rows["cond"]
        out = self.network(torch.cat([x, x]) if cfg else x, torch.cat([t, t]) if cfg else t,
                           encoder_hidden_states=hidden, added_cond_kwargs=self._added(rows, cfg),
                           return_dict=False)[0]
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + self.guidance(conditions) * (out_c - out_u)
        return out

    def _adapter(self, net: denoisers.NetFn) -> Denoiser:
        return self._PREDICTIONS[self.prediction_type](net, self.process)  # the step index as time input

    def _native_times(self, n: int) -> list[float]:
        scheduler = self._fresh_scheduler()
        scheduler.set_timesteps(n, device="cpu")
        steps = len(self.process.betas)
        return [(float(t) + 1.0) / steps for t in scheduler.timesteps]


class StableDiffusionXLModel(StableDiffusionModel):
    def __init__(self, pipe: Any, settings: PipelineSettings):
        super().__init__(pipe, settings)
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # what the pipeline does before every decode: SDXL's fp16 VAE overflows

    def _encode(self, prompts: list[str], negatives: Optional[list[str]], cfg: bool) -> _Embeddings:
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negatives)
        projection = int(pooled.shape[-1]) if self.pipe.text_encoder_2 is None else \
            self.pipe.text_encoder_2.config.projection_dim
        size = (self.height, self.width)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                               text_encoder_projection_dim=projection).to(self.device)
        rows = {"cond": cond, "pooled": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        if cfg:
            rows.update(uncond=uncond, uncond_pooled=uncond_pooled)
        return _Embeddings(rows=rows)

    def _added(self, rows: dict[str, torch.Tensor], cfg: bool) -> Optional[dict[str, torch.Tensor]]:
        if not cfg:
            return {"text_embeds": rows["pooled"], "time_ids": rows["time_ids"]}
        return {"text_embeds": torch.cat([rows["uncond_pooled"], rows["pooled"]]),
                "time_ids": torch.cat([rows["time_ids"], rows["time_ids"]])}

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor


# ----- SD3 and FLUX: transformers on flow matching --------------------------------------------------------------
class _FlowModel(PipelineModel):
    network_name = "transformer"

    def _process(self) -> processes.NoiseProcess:
        if "shift" not in self.pipe.scheduler.config:
            raise ValueError(f"scheduler {type(self.pipe.scheduler).__name__} is not a flow-matching scheduler")
        return processes.get("flow")

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)

    def _adapter(self, net: denoisers.NetFn) -> Denoiser:
        return denoisers.from_flow(net, self.process, time_map=lambda t: 1000.0 * t)

    def _max_sequence_length(self) -> int:
        return self.settings.max_sequence_length or self._call_default("max_sequence_length")

    def _image_seq_len(self) -> int:
        raise NotImplementedError

    def _mu(self) -> Optional[float]:
        return None

    def shift_note(self) -> str:
        mu = self._mu()
        if mu is not None:
            return f"dynamic shift mu={mu:.6g} ({self._image_seq_len()} image tokens)"
        return f"shift={self.pipe.scheduler.config.shift:g}"


class StableDiffusion3Model(_FlowModel):
    def _multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.network.config.patch_size

    def _latent_shape(self) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (self.network.config.in_channels, self.height // f, self.width // f)

    def _encode(self, prompts: list[str], negatives: Optional[list[str]], cfg: bool) -> _Embeddings:
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, negative_prompt=negatives,
            max_sequence_length=self._max_sequence_length())
        rows = {"cond": cond, "pooled": pooled}
        if cfg:
            rows.update(uncond=uncond, uncond_pooled=uncond_pooled)
        return _Embeddings(rows=rows)

    def _forward(self, x: torch.Tensor, t_in: torch.Tensor, rows: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor], conditions: Conditions) -> torch.Tensor:
        cfg = "uncond" in rows
        t = t_in.to(torch.float32)  # the scheduler's timesteps are float32 whatever the model's dtype
        out = self.network(hidden_states=torch.cat([x, x]) if cfg else x, timestep=torch.cat([t, t]) if cfg else t,
                           encoder_hidden_states=torch.cat([rows["uncond"], rows["cond"]]) if cfg else rows["cond"],
                           pooled_projections=torch.cat([rows["uncond_pooled"], rows["pooled"]]) if cfg
                           else rows["pooled"], return_dict=False)[0]
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + self.guidance(conditions) * (out_c - out_u)
        return out

    def _image_seq_len(self) -> int:
        p = self.network.config.patch_size
        return (self.shape[1] // p) * (self.shape[2] // p)

    def _mu(self) -> Optional[float]:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        return calculate_shift(self._image_seq_len(), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.16))

    def _native_times(self, n: int) -> list[float]:
        scheduler = self._fresh_scheduler()
        mu = self._mu()
        scheduler.set_timesteps(n, device="cpu", **({"mu": mu} if mu is not None else {}))
        return [float(s) for s in scheduler.sigmas[:-1]]


class FluxModel(_FlowModel):
    def _multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # latents are packed in 2 x 2 patches

    def _latent_shape(self) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (self.network.config.in_channels // 4, 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2)))

    def _cfg(self, conditions: Conditions) -> bool:
        return self.true_cfg(conditions) > 1.0 and self.negatives(conditions) is not None

    def true_cfg(self, conditions: Conditions) -> float:
        return float(conditions.true_cfg_scale if conditions.true_cfg_scale is not None
                     else self.settings.true_cfg_scale)

    def _encode(self, prompts: list[str], negatives: Optional[list[str]], cfg: bool) -> _Embeddings:
        n = self._max_sequence_length()
        cond, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                         num_images_per_prompt=1, max_sequence_length=n)
        rows, shared = {"cond": cond, "pooled": pooled}, {"text_ids": text_ids}
        if cfg:
            uncond, uncond_pooled, uncond_ids = self.pipe.encode_prompt(
                prompt=negatives, prompt_2=None, device=self.device, num_images_per_prompt=1, max_sequence_length=n)
            rows.update(uncond=uncond, uncond_pooled=uncond_pooled)
            shared["uncond_text_ids"] = uncond_ids
        _, h, w = self.shape
        shared["image_ids"] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, cond.dtype)
        return _Embeddings(rows=rows, shared=shared)

    def _forward(self, x: torch.Tensor, t_in: torch.Tensor, rows: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor], conditions: Conditions) -> torch.Tensor:
        b, c, h, w = x.shape
        packed = self.pipe._pack_latents(x, b, c, h, w)
        timestep = t_in.to(packed.dtype) / 1000  # the pipeline's cast and division of its 1000-scale timestep
        guidance = None
        if self.network.config.guidance_embeds:
            guidance = torch.full([1], self.guidance(conditions), device=self.device, dtype=torch.float32).expand(b)

        def call(embeds: str, pooled: str, text_ids: str) -> torch.Tensor:
            return self.network(hidden_states=packed, timestep=timestep, guidance=guidance,
                                pooled_projections=rows[pooled], encoder_hidden_states=rows[embeds],
                                txt_ids=shared[text_ids], img_ids=shared["image_ids"], return_dict=False)[0]

        out = call("cond", "pooled", "text_ids")
        if "uncond" in rows:
            out_u = call("uncond", "uncond_pooled", "uncond_text_ids")
            out = out_u + self.true_cfg(conditions) * (out - out_u)
        return self.pipe._unpack_latents(out, self.height, self.width, self.pipe.vae_scale_factor)

    def _image_seq_len(self) -> int:
        return (self.shape[1] // 2) * (self.shape[2] // 2)

    def _pipeline_mu(self) -> float:
        """The resolution-dependent shift the pipeline computes (the scheduler uses it with dynamic shifting)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        return calculate_shift(self._image_seq_len(), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def _mu(self) -> Optional[float]:
        return self._pipeline_mu() if self.pipe.scheduler.config.get("use_dynamic_shifting", False) else None

    def _native_times(self, n: int) -> list[float]:
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        scheduler = self._fresh_scheduler()
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n, n)
        retrieve_timesteps(scheduler, n, "cpu", sigmas=sigmas, mu=self._pipeline_mu())
        return [float(s) for s in scheduler.sigmas[:-1]]


FAMILIES: dict[str, type[PipelineModel]] = {
    "StableDiffusionPipeline": StableDiffusionModel,
    "StableDiffusionXLPipeline": StableDiffusionXLModel,
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "FluxPipeline": FluxModel,
}


def pipeline_model(pipe: Any, settings: Optional[PipelineSettings] = None) -> PipelineModel:
    """The family adapter for a loaded diffusers pipeline (exactly one of the classes in FAMILIES)."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"{name} is not supported; supported pipelines: {', '.join(FAMILIES)}")
    return FAMILIES[name](pipe, settings or PipelineSettings())
