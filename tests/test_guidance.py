"""Classifier-free guidance: D_guided = D_u + w (D_c - D_u), on denoisers and on raw network outputs."""

from __future__ import annotations

import math

import pytest
import torch

from s3search import denoisers, processes
from s3search.models.guidance import cfg, conditional_net, guided_net

MEANS = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [0.0, 0.0]])  # class 2 is the "null" (unconditional) class


def _net(calls: list[int]):
    """A nonlinear class-conditional eps-network: out = tanh(x * t) + mean[label] * t."""

    def net(x: torch.Tensor, t_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.tanh(x * t_in[:, None]) + MEANS[labels] * t_in[:, None]

    return net


def test_guided_network_equals_guided_denoiser_in_one_call() -> None:
    # The eps -> x0 adapter is affine in the output, so guiding eps and guiding D agree for every process.
    proc = processes.get("vp-linear")
    calls: list[int] = []
    net = _net(calls)
    w = 3.5
    guided = denoisers.from_eps(guided_net(net, 0, 2, w), proc)
    d_c = denoisers.from_eps(conditional_net(net, 0), proc)
    d_u = denoisers.from_eps(conditional_net(net, 2), proc)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.9, 0.3, 0.02):
        calls.clear()
        got = guided(x, t)
        assert calls == [10]  # conditional and unconditional rows in a single network call
        a, s = proc.alpha(t), proc.sigma(t)
        eps_c, eps_u = net(x, torch.full((5,), t, dtype=x.dtype), torch.zeros(5, dtype=torch.long)), \
            net(x, torch.full((5,), t, dtype=x.dtype), torch.full((5,), 2))
        by_hand = (x - s * (eps_u + w * (eps_c - eps_u))) / a
        torch.testing.assert_close(got, by_hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, cfg(d_c, d_u, w)(x, t), rtol=1e-12, atol=1e-12)


def test_scale_one_is_the_conditional_model_without_the_extra_half() -> None:
    calls: list[int] = []
    net = _net(calls)
    x, t_in = torch.randn(4, 2), torch.full((4,), 0.5)
    out = guided_net(net, 1, 2, 1.0)(x, t_in)
    assert calls == [4]
    torch.testing.assert_close(out, net(x, t_in, torch.ones(4, dtype=torch.long)))


def test_cfg_on_exact_gaussian_class_denoisers_moves_the_mean_by_w() -> None:
    # Classes N(mu_c, I) on EDM: D_c(x, sigma) = mu_c + (x - mu_c) / (1 + sigma^2). At x = 0 the guided output is
    # the extrapolation mu_u + w (mu_c - mu_u), scaled by sigma^2 / (1 + sigma^2).
    edm = processes.get("edm")

    def exact(c: int):
        return denoisers.Denoiser(fn=lambda x, s: MEANS[c] + (x - MEANS[c]) / (1 + s * s), process=edm)

    for w in (0.0, 1.0, 2.0, 7.5):
        sigma = 3.0
        got = cfg(exact(0), exact(2), w)(torch.zeros(1, 2), sigma)
        expected = (MEANS[2] + w * (MEANS[0] - MEANS[2])) * sigma**2 / (1 + sigma**2)
        torch.testing.assert_close(got[0], expected)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "2", True])
def test_bad_scales_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="guidance_scale="):
        guided_net(_net([]), 0, 2, bad)
    edm = processes.get("edm")
    d = denoisers.Denoiser(fn=lambda x, t: x, process=edm)
    with pytest.raises(ValueError, match="guidance_scale="):
        cfg(d, d, bad)


def test_bad_labels_and_mixed_processes_are_refused() -> None:
    with pytest.raises(ValueError, match="class_label=-1"):
        guided_net(_net([]), -1, 2, 2.0)
    with pytest.raises(ValueError, match="null_label=1.5"):
        guided_net(_net([]), 0, 1.5, 2.0)
    a = denoisers.Denoiser(fn=lambda x, t: x, process=processes.get("edm"))
    b = denoisers.Denoiser(fn=lambda x, t: x, process=processes.get("vp-linear"))
    with pytest.raises(ValueError, match="process mismatch"):
        cfg(a, b, 2.0)
    with pytest.raises(ValueError, match="process must be given"):
        cfg(lambda x, t: x, lambda x, t: x, 2.0)
