"""Diffusers pipelines' weights in the original single-file layouts (CompVis / LDM, SGM, MMDiT), for tests.

The inverse of diffusers' conversions in diffusers.loaders.single_file_utils (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
`convert_sd3_transformer_checkpoint_to_diffusers`, the T5 prefix), written from their key mapping: SD 1.x (UNet
under `model.diffusion_model.`, VAE under `first_stage_model.`, CLIP under `cond_stage_model.transformer.`),
SDXL (CLIP-L and OpenCLIP-bigG under `conditioner.embedders.{0,1}.`) and SD3 (MMDiT, text encoders under
`text_encoders.`). It covers the layouts the tiny pipelines use (down blocks of `layers_per_block` resnets and a
downsampler but the last; up blocks of one resnet more and an upsampler but the last) and raises on a key it has
no rule for rather than guess. FLUX is not here: diffusers' conversion assumes the released width (3072).
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["unet_key", "vae_key", "clip_key", "ldm_state_dict"]

# diffusers name -> LDM name of the UNet's layers outside the blocks
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# inside a UNet resnet: diffusers -> LDM
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# inside the VAE's mid attention: diffusers -> LDM (q, k, v and the output are 1x1 convolutions there)
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def unet_key(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """The LDM name of UNet2DConditionModel parameter `key`; `up_attention`: the up blocks that have attentions
    (their upsampler comes after the attention, one index later)."""
    module, param = _split(key)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_down + layer + 1
        return (f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{int(m[1]) * per_down + per_down}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_up + layer
        return (f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(m[1])
        return f"output_blocks.{block * per_up + layers_per_block}.{2 if block in up_attention else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet parameter {key}")


def _resnet(rest: str) -> str:
    module, param = _split(rest)
    if module not in _UNET_RESNET:
        raise KeyError(f"no LDM name for UNet resnet parameter {rest}")
    return f"{_UNET_RESNET[module]}.{param}"


def vae_key(key: str, n_up_blocks: int) -> str:
    """The LDM name of AutoencoderKL parameter `key` (the LDM decoder numbers its up blocks from the bottom)."""
    module, param = _split(key)
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = n_up_blocks - 1 - int(m[1])
        return f"decoder.up.{block}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{n_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        if m[2] not in _VAE_ATTENTION:
            raise KeyError(f"no LDM name for VAE attention parameter {key}")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    raise KeyError(f"no LDM name for VAE parameter {key}")


def clip_key(key: str, prefix: str = "cond_stage_model.transformer.") -> str:
    """The LDM name of a CLIP text-encoder parameter (transformers' own layout under `prefix`); newer transformers
    drop a CLIPTextModel's `text_model.` level, which the checkpoint has."""
    return prefix + (key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key)


_OPEN_CLIP_TOP = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's state in OpenCLIP's layout (SDXL's second text encoder): q, k and v in one
    in_proj, the projection as a matrix applied on the right."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":
                parts = [state[f"text_model.encoder.layers.{m[1]}.self_attn.{c}_proj.{m[3]}"] for c in "qkv"]
                out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _OPEN_CLIP_LAYER:
                raise KeyError(f"no OpenCLIP name for {key}")
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = tensor
        else:
            raise KeyError(f"no OpenCLIP name for {key}")
    return out


def _vae_tensor(ldm: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1x1 convolutions, diffusers' linear layers."""
    if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# SD3's MMDiT: diffusers -> original names outside the blocks, and inside block i (x: image stream, context: text)
_SD3_TOP = {"pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
            "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k",
              "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
# q, k, v projections fused into one qkv in the original
_SD3_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers orders an adaLN output (scale, shift), the original (shift, scale) where the two differ."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_transformer_state(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's state in the original MMDiT layout (without the `model.diffusion_model.`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, param = _split(key)
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = tensor
            continue
        if module in _SD3_TOP:
            out[f"{_SD3_TOP[module]}.{param}"] = _swap_halves(tensor) if module == "norm_out.linear" else tensor
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if m is None:
            raise KeyError(f"no original name for SD3 parameter {key}")
        i, inner = int(m[1]), m[2]
        fused = next(((head, name) for head, name in _SD3_QKV.items()
                      if re.fullmatch(re.escape(head) + r"(q|k|v)(_proj)?", inner)), None)
        if fused is not None:
            head, name = fused
            if inner.startswith(head + "q"):
                tail = "_proj" if inner.endswith("_proj") else ""
                parts = [state[f"transformer_blocks.{i}.{head}{c}{tail}.{param}"] for c in "qkv"]
                out[f"joint_blocks.{i}.{name}.{param}"] = torch.cat(parts)
            continue
        if inner not in _SD3_BLOCK:
            raise KeyError(f"no original name for SD3 parameter {key}")
        # the last block's text stream only conditions the image stream: its adaLN has the diffusers order
        swap = inner == "norm1_context.linear" and i == n_layers - 1
        out[f"joint_blocks.{i}.{_SD3_BLOCK[inner]}.{param}"] = _swap_halves(tensor) if swap else tensor
    return out


def sd3_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD3 pipeline as one original checkpoint: the MMDiT under `model.diffusion_model.`, the VAE under
    `first_stage_model.`, CLIP-L, CLIP-G and T5 under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`."""
    transformer = pipe.transformer
    out = {"model.diffusion_model." + k: v
           for k, v in sd3_transformer_state(transformer.state_dict(), transformer.config.num_layers).items()}
    for key, tensor in pipe.vae.state_dict().items():
        ldm = vae_key(key, len(pipe.vae.config.up_block_types))
        out["first_stage_model." + ldm] = _vae_tensor(ldm, tensor)
    for attr, prefix in (("text_encoder", "text_encoders.clip_l.transformer."),
                         ("text_encoder_2", "text_encoders.clip_g.transformer.")):
        out.update({clip_key(k, prefix): v for k, v in getattr(pipe, attr).state_dict().items()})
    if pipe.text_encoder_3 is not None:
        out.update({"text_encoders.t5xxl.transformer." + k: v for k, v in pipe.text_encoder_3.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """One state dict of `pipe`'s UNet, VAE and text encoder(s) in the LDM layout of SD 1.x, or of SDXL (CLIP-L
    under `conditioner.embedders.0.transformer.`, OpenCLIP-bigG under `conditioner.embedders.1.model.`),
    contiguous copies (safetensors wants them)."""
    unet, vae = pipe.unet, pipe.vae
    up_attention = {i for i, name in enumerate(unet.config.up_block_types) if "CrossAttn" in name}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, unet.config.layers_per_block, up_attention)] = tensor
    for key, tensor in vae.state_dict().items():
        ldm = vae_key(key, len(vae.config.up_block_types))
        out["first_stage_model." + ldm] = _vae_tensor(ldm, tensor)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    for key, tensor in pipe.text_encoder.state_dict().items():
        out[clip_key(key, "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer.")] = tensor
    expected = len(unet.state_dict()) + len(vae.state_dict()) + len(pipe.text_encoder.state_dict())
    if xl:
        second = open_clip_state(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        out.update(second)
        expected += len(second)
    if len(out) != expected:
        raise ValueError("two parameters map to one LDM name")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
