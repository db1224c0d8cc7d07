"""Train the built-in digits denoiser and the digits feature network on the CPU, with a fixed seed.

    OMP_NUM_THREADS=1 python bench/train_digits.py            # writes s3search/models/assets/digits_*
    python bench/train_digits.py --steps 200 --out /tmp/d     # a quick smoke run elsewhere

Data: scikit-learn's bundled digits (1797 images, 8x8, no download). The classifier is trained on a stratified
80 % split and its accuracy is reported on the other 20 %. The denoiser is trained on all 1797 images with the
EDM loss (log-normal sigma, P_mean=-1.2, P_std=1.2, weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) and
an EMA of its weights is saved. Weights are stored as float16 safetensors (< 2 MB) with their config as
metadata; the provenance JSON records seed, steps, data hash, weight hashes, final loss and test accuracy.
At the end a sanity check samples 1000 digits with Euler (= DDIM) at 1000 and 10 steps and prints the Frechet
distance in the classifier's feature space next to the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import copy
import os
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from s3search.models.digits import (ASSETS, DigitsNet, data_sha256, edm_denoise, load_digits_data,
                                    to_model_range)
from s3search.models.digits_features import DigitsClassifier

P_MEAN, P_STD = -1.2, 1.2


def _save(net: torch.nn.Module, path: Path, meta: dict) -> str:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    # One metadata key: safetensors writes several keys in hash order, which would change the file's bytes
    # (and its sha256) from run to run although the tensors are identical.
    save_file(state, str(path), metadata={"s3search": json.dumps(meta, sort_keys=True)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> tuple[DigitsClassifier, float]:
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(),
                                           random_state=seed)
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = x[idx_train], y[idx_train]
    for step in range(steps):
        b = torch.randint(len(yt), (128,), generator=gen)
        # Mild pixel noise so the features vary smoothly around the data, where generated samples land.
        xb = xt[b] + 0.1 * torch.rand(len(b), 1, 1, 1, generator=gen) * torch.randn(xt[b].shape, generator=gen)
        loss = torch.nn.functional.cross_entropy(net(xb), yt[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[idx_test]).argmax(1) == y[idx_test]).float().mean().item()
    return net, acc


def train_denoiser(x: torch.Tensor, seed: int, steps: int, batch: int, lr: float,
                   log) -> tuple[DigitsNet, float, float]:
    torch.manual_seed(seed)
    sigma_data = float(x.std())
    net = DigitsNet()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    running, t0 = None, time.time()
    for step in range(steps):
        x0 = x[torch.randint(len(x), (batch,), generator=gen)]
        sigma = torch.exp(P_MEAN + P_STD * torch.randn(batch, generator=gen))
        noisy = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        loss = (weight.reshape(-1, 1, 1, 1) * (edm_denoise(net, noisy, sigma, sigma_data) - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 500 == 0 or step == steps - 1:
            log(f"denoiser step {step} loss(avg) {running:.4f} elapsed {time.time() - t0:.0f}s")
    return ema.eval(), running, sigma_data


def held_out_loss(net: DigitsNet, x: torch.Tensor, sigma_data: float, seed: int) -> float:
    """EDM loss of the saved (EMA) network on fixed noise: a reproducible number for the provenance file."""
    gen = torch.Generator().manual_seed(seed + 2)
    sigma = torch.exp(P_MEAN + P_STD * torch.randn(len(x), generator=gen))
    noisy = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    with torch.no_grad():
        return float((weight.reshape(-1, 1, 1, 1) * (edm_denoise(net, noisy, sigma, sigma_data) - x) ** 2).mean())


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    ramp = np.linspace(0.0, 1.0, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return s.tolist()


def euler_sample(net: DigitsNet, sigma_data: float, steps: int, n: int, seed: int) -> torch.Tensor:
    """DDIM (= Euler in sigma) on the EDM schedule, returning D at the last sigma (the project's final rule)."""
    sig = karras_sigmas(steps)
    x = sig[0] * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            d = edm_denoise(net, x, torch.full((n,), s), sigma_data)
            x = d + (s_next / s) * (x - d)
        return edm_denoise(net, x, torch.full((n,), sig[-1]), sigma_data)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = np.linalg.eigvalsh(sa @ cb @ sa)
    return float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(m, 0, None)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--classifier-steps", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--no-check", action="store_true", help="skip the sampling sanity check")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    images, labels = load_digits_data()
    x, y = to_model_range(images), torch.as_tensor(labels)

    clf, acc = train_classifier(x, y, args.seed, args.classifier_steps)
    log(f"classifier test accuracy {acc:.4f}")
    clf_sha = _save(clf, args.out / "digits_features.safetensors",
                    {"config": clf.config, "test_accuracy": round(acc, 4)})

    net, final_loss, sigma_data = train_denoiser(x, args.seed, args.steps, args.batch, args.lr, log)
    eval_loss = held_out_loss(net, x, sigma_data, args.seed)
    den_sha = _save(net, args.out / "digits_denoiser.safetensors",
                    {"config": net.config, "sigma_data": sigma_data})
    # Reload the float16-rounded weights so the sanity check measures what is committed.
    from s3search.models.digits import load_denoiser_net
    net, _ = load_denoiser_net(args.out / "digits_denoiser.safetensors")
    provenance = {
        "data": "sklearn.datasets.load_digits (1797 x 8 x 8, uint8 0..16), scaled v / 8 - 1",
        "data_sha256": data_sha256(images),
        "seed": args.seed,
        "torch": torch.__version__,
        "denoiser_steps": args.steps,
        "denoiser_batch": args.batch,
        "denoiser_lr": args.lr,
        "denoiser_loss": "EDM, log-normal sigma (P_mean=-1.2, P_std=1.2), EMA 0.999",
        "sigma_data": sigma_data,
        "denoiser_final_train_loss": round(final_loss, 5),
        "denoiser_fixed_noise_loss": round(eval_loss, 5),
        "denoiser_sha256": den_sha,
        "classifier_steps": args.classifier_steps,
        "classifier_test_accuracy": round(acc, 4),
        "classifier_split": f"stratified 80/20, random_state={args.seed}",
        "classifier_sha256": clf_sha,
        "train_seconds": round(time.time() - t_start, 1),
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/train_digits.py "
                   f"--seed {args.seed} --steps {args.steps} --batch {args.batch} --lr {args.lr} "
                   f"--classifier-steps {args.classifier_steps}",
    }
    (args.out / "digits_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"saved to {args.out}: fixed-noise loss {eval_loss:.4f}")

    if not args.no_check:
        feats = lambda t: clf.features(t).detach()  # noqa: E731
        gen = torch.Generator().manual_seed(123)
        real_a = x[torch.randint(len(x), (1000,), generator=gen)]
        real_b = x[torch.randint(len(x), (1000,), generator=gen)]
        log(f"FD real-vs-real (1000 vs 1000, with replacement) {frechet(feats(real_a), feats(real_b)):.3f}")
        for steps in (1000, 50, 10, 5):
            sample = euler_sample(net, sigma_data, steps, 1000, seed=7)
            log(f"FD Euler/DDIM {steps} steps vs real {frechet(feats(sample), feats(real_a)):.3f}")


if __name__ == "__main__":
    main()
