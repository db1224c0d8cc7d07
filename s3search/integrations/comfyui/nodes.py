"""The ComfyUI node: a solver schedule (file or job URL) as SIGMAS and a SAMPLER for SamplerCustom.

ComfyUI's classic node convention: INPUT_TYPES / RETURN_TYPES / FUNCTION / CATEGORY on the class, an
instance method named by FUNCTION returning a tuple, and IS_CHANGED deciding when a cached output is stale.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch

from s3search.integrations.comfyui.loader import API_KEY_ENV, is_url, read_source
from s3search.integrations.comfyui.sampler import comfy_sampler, frame_of, schedule_sigmas

__all__ = ["S3SearchSchedule", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

NODE_NAME = "S3SearchSchedule"


class S3SearchSchedule:
    """Load a searched schedule; SIGMAS is its grid and SAMPLER runs every one of its per-step choices."""

    DESCRIPTION = ("Loads an s3search solver schedule from a JSON file or a job's /schedule URL. Connect SIGMAS and "
                   "SAMPLER to SamplerCustom; connect the same MODEL here so SIGMAS are in the model's sigma space.")
    RETURN_TYPES = ("SIGMAS", "SAMPLER")
    RETURN_NAMES = ("sigmas", "sampler")
    OUTPUT_TOOLTIPS = ("The schedule's own grid; it ends in 0.0 only when the schedule ends with a final denoise.",
                       "Runs the schedule's per-step solver choices exactly (on another grid: re-timed to it).")
    FUNCTION = "load"
    CATEGORY = "sampling/custom_sampling/s3search"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "source": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "A schedule JSON file, or https://HOST/v1/jobs/JOB_ID/schedule"}),
            },
            "optional": {
                "api_key": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": f"For a URL; empty uses ${API_KEY_ENV}. A key typed here is "
                                                  "saved in the workflow and in every image's metadata."}),
                "model": ("MODEL", {"tooltip": "The model SamplerCustom samples (sets the SIGMAS space: flow "
                                               "sigmas for SD3 / FLUX, VE sigmas otherwise)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, source: str = "", **_: Any) -> Any:
        # A job's best schedule can change between runs, so a URL is fetched every time (NaN never equals
        # itself); a file is re-read when it changes on disk.
        source = (source or "").strip()
        if not source or is_url(source):
            return float("nan")
        try:
            st = os.stat(os.path.expanduser(source))
        except OSError:
            return float("nan")
        return f"{st.st_mtime_ns}:{st.st_size}"

    def load(self, source: str, api_key: str = "", model: Optional[Any] = None) -> tuple[torch.Tensor, Any]:
        loaded = read_source(source, api_key)
        schedule = loaded.schedule
        frame = None if model is None else frame_of(model)
        sigmas = torch.tensor(schedule_sigmas(schedule, frame), dtype=torch.float32)
        if not all(math.isfinite(float(s)) for s in sigmas):
            raise ValueError(f"{source}: the schedule's sigmas overflow float32 in frame {frame or 'default'}")
        return sigmas, comfy_sampler(schedule, loaded.data_mean)


NODE_CLASS_MAPPINGS = {NODE_NAME: S3SearchSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {NODE_NAME: "s3search Schedule (SIGMAS + SAMPLER)"}
