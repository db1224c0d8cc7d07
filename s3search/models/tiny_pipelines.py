"""Tiny random-weight diffusers pipelines of every supported family, built from configs with tokenizers written
offline from a small vocabulary: for tests, smoke runs and `bench/gpu_check.py`. Nothing is downloaded.

    pipe = tiny_pipeline("sd", workdir)        # a real StableDiffusionPipeline, 16 x 16 pixels, 8 x 8 latents
    pipe.save_pretrained(folder, safe_serialization=True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = ["HEIGHT", "WIDTH", "FAMILIES", "tiny_pipeline", "clip_tokenizer", "t5_tokenizer", "eval_mode"]

HEIGHT = WIDTH = 16          # pixels; the tiny VAEs downsample by 2, so latents are 8 x 8


def _libs() -> tuple[Any, Any, Any]:
    import diffusers
    import tokenizers
    import transformers

    return diffusers, transformers, tokenizers


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer written to `folder` from a byte alphabet and two merges; (tokenizer, vocab size)."""
    _, transformers, _ = _libs()
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "ca", "cat</w>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), len(vocab)


def t5_tokenizer(folder: Path):
    """A T5 (unigram) tokenizer written to `folder`; (tokenizer, vocab size)."""
    _, transformers, tokenizers = _libs()
    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"▁{w}", -1.0) for w in ("a", "cat", "dog")),
              *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁")]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                                  special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0, "model_max_length": 512}))
    return transformers.T5TokenizerFast.from_pretrained(str(folder)), len(pieces)


def _clip(vocab: int, projection_dim: Optional[int] = None):
    _, transformers, _ = _libs()
    config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=vocab, max_position_embeddings=77,
                                         **({"projection_dim": projection_dim} if projection_dim else {}))
    if projection_dim:
        return transformers.CLIPTextModelWithProjection(config)
    return transformers.CLIPTextModel(config)


def _t5(vocab: int):
    _, transformers, _ = _libs()
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _vae(**kw: Any):
    diffusers, _, _ = _libs()
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=HEIGHT,
                                   **kw)


def _unet(**kw: Any):
    diffusers, _, _ = _libs()
    return diffusers.UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
                                          in_channels=4, out_channels=4, norm_num_groups=8,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                          attention_head_dim=(2, 4), **kw)


def _sd(tmp: Path, prediction_type: str = "epsilon"):
    diffusers, _, _ = _libs()
    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(tmp / "tok")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=prediction_type)
    return diffusers.StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(vocab), tokenizer=tok,
                                             unet=_unet(cross_attention_dim=32), scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _sdxl(tmp: Path):
    diffusers, _, _ = _libs()
    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(tmp / "tok")
    # the pooled embedding (32) and six time ids of 8 features each enter the added embedding
    unet = _unet(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=32 + 6 * 8)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    return diffusers.StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(vocab), tokenizer=tok,
                                               text_encoder_2=_clip(vocab, projection_dim=32), tokenizer_2=tok,
                                               unet=unet, scheduler=scheduler, add_watermarker=False)


def _sd3(tmp: Path, with_t5: bool = True):
    diffusers, _, _ = _libs()
    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(tmp / "tok")
    t5_tok, t5_vocab = t5_tokenizer(tmp / "t5tok")
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4,
                                                  num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                  caption_projection_dim=32, joint_attention_dim=32,
                                                  pooled_projection_dim=64)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(vocab, projection_dim=32), tokenizer=tok,
        text_encoder_2=_clip(vocab, projection_dim=32), tokenizer_2=tok,
        text_encoder_3=_t5(t5_vocab) if with_t5 else None, tokenizer_3=t5_tok if with_t5 else None)


def _flux(tmp: Path):
    diffusers, _, _ = _libs()
    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(tmp / "tok")
    t5_tok, t5_vocab = t5_tokenizer(tmp / "t5tok")
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2,
                                                   joint_attention_dim=32, pooled_projection_dim=32,
                                                   guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=16,
                                                          max_image_seq_len=256)
    return diffusers.FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(vocab), tokenizer=tok, text_encoder_2=_t5(t5_vocab), tokenizer_2=t5_tok)


FAMILIES: dict[str, Callable[[Path], Any]] = {"sd": _sd, "sd-v": lambda tmp: _sd(tmp, "v_prediction"), "sdxl": _sdxl, "sd3": _sd3,
            "sd3-no-t5": lambda tmp: _sd3(tmp, with_t5=False), "flux": _flux}


def eval_mode(pipe):
    """As from_pretrained leaves them: a new T5 is in training mode, whose dropout would make each call differ."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe



def tiny_pipeline(family: str, workdir: Path) -> Any:
    """A tiny random pipeline of `family` (see FAMILIES) in eval mode; tokenizer files go under `workdir`."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {', '.join(FAMILIES)}")
    return eval_mode(FAMILIES[family](Path(workdir)))
