"""Train the two text-to-image digits test beds on the CPU, with a fixed seed, as real diffusers pipeline folders.

    python bench/train_digits_t2i.py --stage vae     # VAE + text side, to --work
    python bench/train_digits_t2i.py --stage sd      # digits-t2i: UNet2DConditionModel, eps, scaled_linear betas
    python bench/train_digits_t2i.py --stage flow    # digits-t2i-flow: SD3Transformer2DModel, rectified flow
    python bench/train_digits_t2i.py --stage grids   # redraw docs/bench/plots/digits_t2i/ from the folders

Data: scikit-learn's bundled digits (1797 images, 8x8, 1 channel, no download), scaled v / 8 - 1 as the `digits`
model does. Prompts: 10 digits x 4 phrasings ("a handwritten 7", "the digit seven", "a bold 7", "number 7").

- VAE: an `AutoencoderKL` 8x8x1 -> 4x4x4 (one channel in and out: the project's digits classifier reads
  [B, 1, 8, 8] in [-1, 1], and the pipelines' image processor handles grey images), reconstruction + small KL.
  Its scaling factor (and, for SD3, shift factor) makes the latents unit-variance / zero-mean.
- Text side: an offline `CLIPTokenizer` whose vocabulary holds the prompt words as whole tokens, with
  model_max_length 8 (every prompt fits; short sequences keep cross attention cheap), and a tiny CLIP text
  encoder kept random but fixed (seeded): the UNet / transformer learns to read its embeddings, and the measured
  prompt accuracy says that is enough. The SD3 pipeline's two CLIP encoders share these weights.
- The denoisers train on the VAE latents with 10 % of prompts replaced by the empty prompt, so classifier-free
  guidance works. Embeddings come from the pipelines' own `encode_prompt`, exactly as at sampling time.
  SD3 without T5 appends `max_sequence_length` zero tokens; the flow model trains with 8 of them, and its
  registry entry samples with max_sequence_length = 8.

Threads: one per process by default (--threads 1). On the shared 2-core machine two threads per process ran a
VAE step 20x slower than one (contention with other jobs), so the sd and flow stages run side by side instead.

After training, each pipeline is saved with save_pretrained (safetensors), reloaded, sampled with its stock
scheduler at guidance 1 and 7.5, and the digits classifier's accuracy for the prompted digit is measured; a
sample grid per guidance scale goes to docs/bench/plots/digits_t2i/ and a provenance.json next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from s3search.models.digits import ASSETS, data_sha256, load_digits_data, to_model_range

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASINGS = ["a handwritten {d}", "the digit {w}", "a bold {d}", "number {d}"]
MAX_TOKENS = 8          # bos + at most 4 words + eos, padded
FLOW_T5_TOKENS = 8      # zero "T5" tokens the SD3 pipeline appends when text_encoder_3 is None
PROMPT_DROPOUT = 0.1
PLOTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "plots" / "digits_t2i"


def prompts_for(digit: int) -> list[str]:
    return [p.format(d=digit, w=WORDS[digit]) for p in PHRASINGS]


def all_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) for every digit and phrasing, digit-major, as the shipped prompts.txt lists them."""
    return [(p, d) for d in range(10) for p in prompts_for(d)]


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- text side
def write_tokenizer(folder: Path):
    """A CLIP tokenizer whose BPE merges build each prompt word left to right, so every word is one token; any
    other text still tokenizes, into single characters of the byte alphabet."""
    import transformers

    from s3search.models.tiny_pipelines import _byte_chars

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for p, _ in all_prompts() for w in p.split() if not w.isdigit()})
    chars = _byte_chars()
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}))
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    for word in words:  # the merges must not interfere with one another
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)
    for p, _ in all_prompts():
        assert len(tok(p).input_ids) <= MAX_TOKENS, p
    return tok


def text_encoder(vocab_size: int, seed: int):
    """The random-but-fixed CLIP text encoder with projection (SD3); SD's CLIPTextModel is its text_model."""
    import transformers

    config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                         intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS,
                                         projection_dim=32)
    torch.manual_seed(seed)
    with_proj = transformers.CLIPTextModelWithProjection(config).eval()
    plain = transformers.CLIPTextModel(config).eval()
    plain.load_state_dict(with_proj.text_model.state_dict())  # transformers 5: CLIPTextModel is the text model
    return plain, with_proj


# ---------------------------------------------------------------------------------------------------------- VAE
def make_vae():
    import diffusers

    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32),
                                   layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=8)


def train_vae(x: torch.Tensor, seed: int, steps: int, batch: int, kl_weight: float):
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    running, t0 = None, time.time()
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / 64.0
        loss = torch.nn.functional.mse_loss(rec, xb) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss(avg) {running:.4f} kl {kl.item():.3f} elapsed {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        mse = float(torch.nn.functional.mse_loss(rec, x))
        mean, std = float(post.mean.mean()), float(post.mean.std())
    return vae, {"vae_steps": steps, "vae_batch": batch, "vae_kl_weight": kl_weight, "vae_final_loss": running,
                 "vae_recon_mse_all": mse, "latent_mean": mean, "latent_std": std}, rec


def stage_vae(args, x: torch.Tensor, labels: torch.Tensor) -> None:
    from s3search.models.digits_features import load_classifier

    t0 = time.time()
    vae, info, rec = train_vae(x, args.seed, args.vae_steps, 128, args.kl_weight)
    clf, _ = load_classifier()
    with torch.no_grad():
        info["classifier_accuracy_on_reconstructions"] = float((clf(rec).argmax(1) == labels).float().mean())
        info["classifier_accuracy_on_data"] = float((clf(x).argmax(1) == labels).float().mean())
    info["vae_seconds"] = round(time.time() - t0, 1)
    log(f"vae done: {info}")
    args.work.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.work / "vae", safe_serialization=True)
    (args.work / "vae_info.json").write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------------------- shared parts
def load_work(args):
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(args.work / "vae").eval().requires_grad_(False)
    info = json.loads((args.work / "vae_info.json").read_text())
    tok = write_tokenizer(args.work / "tokenizer")
    plain, with_proj = text_encoder(len(tok.get_vocab()), args.seed + 7)
    return vae, info, tok, plain, with_proj


def latent_stats(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    return post.mean, post.std


class Ema:
    def __init__(self, net: torch.nn.Module) -> None:
        self.net = copy.deepcopy(net).requires_grad_(False)

    def update(self, net: torch.nn.Module, step: int) -> None:
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(self.net.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - decay)


def optimise(loss: torch.Tensor, net: torch.nn.Module, opt, sched, ema: Ema, step: int,
             running: float | None) -> float:
    """One optimiser step of a denoiser (clipped gradients, learning-rate schedule, EMA); the running loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.update(net, step)
    return loss.item() if running is None else 0.99 * running + 0.01 * loss.item()


def lr_lambda(steps: int):
    warmup = max(1, steps // 50)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))


def sha256_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "provenance.json"}


def prompt_accuracy(pipe, guidance: float, n: int, seed: int, steps: int, extra: dict) -> tuple[float, float,
                                                                                                 torch.Tensor]:
    """(argmax accuracy, mean probability of the prompted digit, images [n, 1, 8, 8] in [-1, 1]) over n samples
    cycling through every prompt, sampled by the stock pipeline with its stock scheduler."""
    from s3search.models.digits_features import load_classifier

    clf, _ = load_classifier()
    table = all_prompts()
    prompts = [table[i % len(table)][0] for i in range(n)]
    digits = torch.tensor([table[i % len(table)][1] for i in range(n)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                   output_type="pt", **extra).images
        images = (out.float() * 2 - 1).clamp(-1, 1)
        prob = clf(images).softmax(1)
    acc = float((prob.argmax(1) == digits).float().mean())
    return acc, float(prob[torch.arange(n), digits].mean()), images


def sample_grid(pipe, guidance: float, seed: int, steps: int, extra: dict, path: Path, title: str) -> None:
    """10 rows (digit 0..9, prompt 'a handwritten d') x 10 samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = [f"a handwritten {d}" for d in range(10) for _ in range(10)]
    with torch.no_grad():
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="np", **extra).images
    # a one-pixel blank border around every 8x8 tile, so neighbouring digits do not run together
    tiles = np.pad(out[..., 0].reshape(10, 10, 8, 8), ((0, 0), (0, 0), (1, 1), (1, 1)))
    tiles = tiles.transpose(0, 2, 1, 3).reshape(100, 100)
    fig, ax = plt.subplots(figsize=(4, 4.3), dpi=100)
    ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([5 + 10 * d for d in range(10)], [str(d) for d in range(10)])
    ax.set_title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def evaluate_and_record(pipe_cls, folder: Path, name: str, args, provenance: dict, steps: int,
                        extra: dict) -> None:
    # SD3 without T5 is loaded as diffusers documents it: text_encoder_3=None, tokenizer_3=None
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if "3" in pipe_cls.__name__ else {}
    pipe = pipe_cls.from_pretrained(folder, **kwargs).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for guidance in (1.0, 7.5):
        acc, prob, _ = prompt_accuracy(pipe, guidance, args.eval_samples, args.seed + 100, steps, extra)
        results[str(guidance)] = {"accuracy": round(acc, 4), "mean_probability": round(prob, 4)}
        log(f"{name} guidance {guidance}: prompt accuracy {acc:.3f}, mean prob {prob:.3f}")
        sample_grid(pipe, guidance, args.seed + 200, steps, extra, PLOTS / f"{name}_cfg{guidance:g}.png",
                    f"{name}, {type(pipe.scheduler).__name__} {steps} steps, guidance {guidance:g}")
    provenance["prompt_accuracy"] = {"samples": args.eval_samples, "sampler": type(pipe.scheduler).__name__,
                                     "steps": steps, "seed": args.seed + 100, **results,
                                     "classifier": "s3search/models/assets/digits_features.safetensors"}
    provenance["sha256"] = sha256_files(folder)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    (folder / "prompts.txt").write_text("\n".join(p for p, _ in all_prompts()) + "\n")
    provenance["sha256"] = sha256_files(folder)
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")


def stage_grids(args) -> None:
    """Redraw the sample grids from the shipped folders (the models are not changed)."""
    import diffusers

    for pipe_cls, folder, name, extra in (
            (diffusers.StableDiffusionPipeline, args.out / "digits_t2i", "digits-t2i", {}),
            (diffusers.StableDiffusion3Pipeline, args.out / "digits_t2i_flow", "digits-t2i-flow",
             {"max_sequence_length": FLOW_T5_TOKENS})):
        kwargs = {"text_encoder_3": None, "tokenizer_3": None} if "3" in pipe_cls.__name__ else {}
        pipe = pipe_cls.from_pretrained(folder, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        for guidance in (1.0, 7.5):
            sample_grid(pipe, guidance, args.seed + 200, args.eval_steps, extra, PLOTS / f"{name}_cfg{guidance:g}.png",
                        f"{name}, {type(pipe.scheduler).__name__} {args.eval_steps} steps, guidance {guidance:g}")


def base_provenance(args, x_images: np.ndarray, info: dict, stage: str) -> dict:
    return {"script": "bench/train_digits_t2i.py", "command": f"python bench/train_digits_t2i.py --stage vae "
            f"--seed {args.seed} --vae-steps {info['vae_steps']}; python bench/train_digits_t2i.py --stage {stage} "
            f"--seed {args.seed} --steps {args.steps} --batch {args.batch} --lr {args.lr}",
            "seed": args.seed, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "data": "sklearn.datasets.load_digits (1797 x 8 x 8, uint8 0..16), scaled v / 8 - 1, 1 channel",
            "data_sha256": data_sha256(x_images), "prompts": "10 digits x " + " | ".join(PHRASINGS),
            "prompt_dropout": PROMPT_DROPOUT, "text_encoder": "CLIP, 2 layers, hidden 32, random but fixed "
            f"(torch.manual_seed({args.seed + 7})), tokenizer model_max_length {MAX_TOKENS}", "vae": info}


# ------------------------------------------------------------------------------------------------- digits-t2i
def sd_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def make_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=32,
                                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                          mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=8)


def stage_sd(args, x: torch.Tensor, images: np.ndarray, labels: torch.Tensor) -> None:
    import diffusers

    t_start = time.time()
    vae0, info, tok, plain, _ = load_work(args)
    mean, std = latent_stats(vae0, x)
    vae = make_vae()
    vae.load_state_dict(vae0.state_dict())
    vae.register_to_config(scaling_factor=round(1.0 / info["latent_std"], 5))
    vae.eval().requires_grad_(False)
    scheduler = diffusers.DDIMScheduler(**sd_scheduler_config())
    torch.manual_seed(args.seed + 3)
    unet = make_unet()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=plain, tokenizer=tok, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    with torch.no_grad():
        emb = pipe.encode_prompt([p for d in range(10) for p in prompts_for(d)], "cpu", 1, False)[0]
        empty = pipe.encode_prompt([""], "cpu", 1, False)[0]
    by_digit = emb.reshape(10, len(PHRASINGS), *emb.shape[1:])
    alphas = scheduler.alphas_cumprod.float()
    sf = vae.config.scaling_factor
    ema = Ema(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    gen = torch.Generator().manual_seed(args.seed + 4)
    running, t0 = None, time.time()
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        cond = by_digit[labels[idx], torch.randint(len(PHRASINGS), (args.batch,), generator=gen)]
        drop = torch.rand(args.batch, generator=gen) < PROMPT_DROPOUT
        cond = torch.where(drop.reshape(-1, 1, 1), empty.expand_as(cond), cond)
        t = torch.randint(1000, (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].reshape(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, eps)
        running = optimise(loss, unet, opt, sched, ema, step, running)
        if step % 100 == 0 or step == args.steps - 1:
            log(f"sd step {step} loss(avg) {running:.4f} elapsed {time.time() - t0:.0f}s")
    train_seconds = time.time() - t0
    pipe.unet = ema.net.eval()
    pipe.register_modules(unet=ema.net.eval())
    folder = args.out / "digits_t2i"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    prov = base_provenance(args, images, info, "sd")
    prov.update({"model": "digits-t2i: StableDiffusionPipeline, UNet2DConditionModel (32, 64) on a 4x4x4 latent, "
                 "eps prediction, scaled_linear betas 0.00085..0.012, DDIMScheduler",
                 "unet_parameters": sum(p.numel() for p in unet.parameters()), "steps": args.steps,
                 "batch": args.batch, "lr": args.lr, "loss": "eps MSE, t uniform in 0..999, EMA 0.999",
                 "final_train_loss": round(running, 5), "train_seconds": round(train_seconds, 1)})
    evaluate_and_record(diffusers.StableDiffusionPipeline, folder, "digits-t2i", args, prov, args.eval_steps, {})
    log(f"digits-t2i done in {time.time() - t_start:.0f}s")


# -------------------------------------------------------------------------------------------- digits-t2i-flow
FLOW_SHIFT = 3.0


def make_transformer():
    import diffusers

    return diffusers.SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                           attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                           caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=8)


def stage_flow(args, x: torch.Tensor, images: np.ndarray, labels: torch.Tensor) -> None:
    import diffusers

    t_start = time.time()
    vae0, info, tok, _, with_proj = load_work(args)
    mean, std = latent_stats(vae0, x)
    vae = make_vae()
    vae.load_state_dict(vae0.state_dict())
    vae.register_to_config(scaling_factor=round(1.0 / info["latent_std"], 5),
                           shift_factor=round(info["latent_mean"], 5))
    vae.eval().requires_grad_(False)
    torch.manual_seed(args.seed + 5)
    transformer = make_transformer()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=vae,
        text_encoder=with_proj, tokenizer=tok, text_encoder_2=copy.deepcopy(with_proj), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt([p for d in range(10) for p in prompts_for(d)], None, None,
                                               device="cpu", do_classifier_free_guidance=False,
                                               max_sequence_length=FLOW_T5_TOKENS)
        empty, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, device="cpu",
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=FLOW_T5_TOKENS)
    by_digit = emb.reshape(10, len(PHRASINGS), *emb.shape[1:])
    pooled_by_digit = pooled.reshape(10, len(PHRASINGS), -1)
    sf, shift_factor = vae.config.scaling_factor, vae.config.shift_factor
    ema = Ema(transformer)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
    gen = torch.Generator().manual_seed(args.seed + 6)
    running, t0 = None, time.time()
    transformer.train()
    for step in range(args.steps):
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        z0 = ((mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) - shift_factor) * sf
        k = torch.randint(len(PHRASINGS), (args.batch,), generator=gen)
        cond, pool = by_digit[labels[idx], k], pooled_by_digit[labels[idx], k]
        drop = torch.rand(args.batch, generator=gen) < PROMPT_DROPOUT
        cond = torch.where(drop.reshape(-1, 1, 1), empty.expand_as(cond), cond)
        pool = torch.where(drop.reshape(-1, 1), empty_pooled.expand_as(pool), pool)
        # logit-normal t (SD3), shifted as the sampler's sigmas are, so training weights the times sampling visits
        u = torch.sigmoid(torch.randn(args.batch, generator=gen))
        sigma = FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)
        noise = torch.randn(z0.shape, generator=gen)
        s = sigma.reshape(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise
        pred = transformer(hidden_states=zt, encoder_hidden_states=cond, pooled_projections=pool,
                           timestep=sigma * 1000).sample
        loss = torch.nn.functional.mse_loss(pred, noise - z0)
        running = optimise(loss, transformer, opt, sched, ema, step, running)
        if step % 100 == 0 or step == args.steps - 1:
            log(f"flow step {step} loss(avg) {running:.4f} elapsed {time.time() - t0:.0f}s")
    train_seconds = time.time() - t0
    pipe.register_modules(transformer=ema.net.eval())
    folder = args.out / "digits_t2i_flow"
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained leaves the absent T5 out of model_index.json; listed as [null, null] (as SD's absent safety
    # checker is) the folder says it has none, and the registry's loader passes None for it
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    prov = base_provenance(args, images, info, "flow")
    prov.update({"model": "digits-t2i-flow: StableDiffusion3Pipeline without T5, SD3Transformer2DModel (3 layers, "
                 f"width 64) on a 4x4x4 latent, rectified flow, FlowMatchEulerDiscreteScheduler(shift={FLOW_SHIFT})",
                 "transformer_parameters": sum(p.numel() for p in transformer.parameters()), "steps": args.steps,
                 "batch": args.batch, "lr": args.lr, "max_sequence_length": FLOW_T5_TOKENS,
                 "loss": "flow MSE (target noise - x0), logit-normal t shifted by 3, EMA 0.999",
                 "final_train_loss": round(running, 5), "train_seconds": round(train_seconds, 1)})
    evaluate_and_record(diffusers.StableDiffusion3Pipeline, folder, "digits-t2i-flow", args, prov, args.eval_steps,
                        {"max_sequence_length": FLOW_T5_TOKENS})
    log(f"digits-t2i-flow done in {time.time() - t_start:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("vae", "sd", "flow", "grids"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--kl-weight", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/digits_t2i_work"))
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = load_digits_data()
    x = to_model_range(images)
    y = torch.as_tensor(labels)
    {"vae": lambda: stage_vae(args, x, y), "sd": lambda: stage_sd(args, x, images, y),
     "flow": lambda: stage_flow(args, x, images, y), "grids": lambda: stage_grids(args)}[args.stage]()


if __name__ == "__main__":
    main()
