"""The built-in text-to-image digits test beds: `digits-t2i` (Stable-Diffusion-shaped) and `digits-t2i-flow`
(SD3-shaped, rectified flow), pipeline folders in the package's assets trained by bench/train_digits_t2i.py.

Both are ordinary `diffusers-pipeline` registry entries (s3search.models.local), built here in code rather than read
from a registry file, so they load, check and fingerprint exactly as a user's pipeline folder does. Each folder
ships its prompt set (prompts.txt: 10 digits x 4 phrasings) and a provenance.json with the sha256 of its files.
The flow model was trained with 8 zero "T5" tokens (the SD3 pipeline's stand-in when text_encoder_3 is None), so
its entry samples with max_sequence_length = 8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import ModelSpec

__all__ = ["ASSETS", "SD_FOLDER", "FLOW_FOLDER", "GUIDANCE", "entries", "builtin_models"]

ASSETS = Path(__file__).parent / "assets"
SD_FOLDER = ASSETS / "digits_t2i"
FLOW_FOLDER = ASSETS / "digits_t2i_flow"
GUIDANCE = 7.5          # the default guidance scale; a job may set its own
FLOW_SEQUENCE_LENGTH = 8
# rows per network call: these networks are tiny, so one call takes a whole evaluation batch
BATCH_SIZE = 1024


def entries():
    """The two LocalModelEntry objects (a list), as a registry file would give them."""
    from .local.registry_file import LocalModelEntry

    common = dict(kind="diffusers-pipeline", guidance_scale=GUIDANCE, prompts={"digits": "prompts.txt"},
                  prompt="a handwritten 7", device="auto", batch_size=BATCH_SIZE, metric="trajectory")
    return [
        LocalModelEntry(name="digits-t2i", path=str(SD_FOLDER), where="built-in: models.digits-t2i",
                        base_dir=SD_FOLDER, description="StableDiffusionPipeline on the 8x8 digits: 4x4x4 latent, "
                        "eps UNet, scaled_linear betas, trained here (bench/train_digits_t2i.py)", **common),
        LocalModelEntry(name="digits-t2i-flow", path=str(FLOW_FOLDER), where="built-in: models.digits-t2i-flow",
                        base_dir=FLOW_FOLDER, max_sequence_length=FLOW_SEQUENCE_LENGTH,
                        description="StableDiffusion3Pipeline (no T5) on the 8x8 digits: 4x4x4 latent, rectified "
                        "flow transformer, trained here (bench/train_digits_t2i.py)", **common),
    ]


def builtin_models() -> dict[str, Callable[[], ModelSpec]]:
    """name -> factory; a folder not shipped (a partial checkout) is simply not offered. Nothing of diffusers is
    imported until a model is built, so listing the registry stays cheap."""

    def build(entry) -> ModelSpec:
        from .local.build import build_model

        return build_model(entry)

    return {e.name: (lambda e=e: build(e)) for e in entries() if (Path(e.path) / "model_index.json").is_file()}
