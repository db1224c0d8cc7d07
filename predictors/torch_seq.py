"""A torch sequence model: a per-step encoder, then an LSTM (or mean/last-pooling MLP) head, trained with a
pairwise logistic (RankNet) loss on pairs drawn within one group.

Saved as safetensors weights + JSON config (architecture, feature normalisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from s3search.schedule import SolverSchedule

from . import features
from .base import Predictor

__all__ = ["SequenceNet", "TorchLSTMPredictor", "TorchMLPPredictor", "pairwise_logistic_loss"]

_WEIGHTS = "weights.safetensors"


class SequenceNet(nn.Module):
    def __init__(self, step_dim: int, global_dim: int, hidden: int, head: str) -> None:
        super().__init__()
        if head not in ("lstm", "mlp"):
            raise ValueError(f"head={head!r} must be lstm or mlp")
        self.head_kind = head
        self.encoder = nn.Sequential(nn.Linear(step_dim + global_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden), nn.GELU())
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True) if head == "lstm" else None
        self.out = nn.Sequential(nn.Linear(2 * hidden + global_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, steps: torch.Tensor, lengths: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        b, n, _ = steps.shape
        mask = (torch.arange(n)[None, :] < lengths[:, None]).to(steps.dtype)          # [B, N]
        z = self.encoder(torch.cat([steps, glob[:, None, :].expand(b, n, glob.shape[-1])], dim=-1))
        if self.lstm is not None:
            z, _ = self.lstm(z)
        z = z * mask[..., None]
        mean = z.sum(1) / lengths[:, None].to(z.dtype)
        last = z[torch.arange(b), lengths - 1]
        return self.out(torch.cat([mean, last, glob], dim=-1)).squeeze(-1)


def pairwise_logistic_loss(scores: torch.Tensor, targets: torch.Tensor, i: torch.Tensor,
                           j: torch.Tensor) -> torch.Tensor:
    """RankNet loss on pairs (i, j): log(1 + exp(-(s_j - s_i) sign(y_j - y_i))), weighted by |y_j - y_i|."""
    diff = targets[j] - targets[i]
    sign = torch.sign(diff)
    keep = sign != 0
    w = diff.abs().clamp(max=3.0)[keep]
    loss = nn.functional.softplus(-(scores[j] - scores[i])[keep] * sign[keep])
    return (w * loss).sum() / w.sum().clamp(min=1e-12)


class _TorchSeq(Predictor):
    head: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {"hidden": 48, "epochs": 300, "lr": 3e-3, "weight_decay": 1e-4,
                                          "pairs_per_step": 2048}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net: SequenceNet | None = None
        self.norm: dict[str, list[float]] = {}

    def _tensors(self, schedules: Sequence[SolverSchedule]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps, lengths, glob = features.sequences(schedules, self.feature_spec.max_steps)
        s_mu, s_sd = np.asarray(self.norm["step_mean"]), np.asarray(self.norm["step_std"])
        g_mu, g_sd = np.asarray(self.norm["global_mean"]), np.asarray(self.norm["global_std"])
        steps = (steps - s_mu) / s_sd
        steps[np.arange(steps.shape[1])[None, :] >= lengths[:, None]] = 0.0
        return (torch.as_tensor(steps, dtype=torch.float32), torch.as_tensor(lengths),
                torch.as_tensor((glob - g_mu) / g_sd, dtype=torch.float32))

    def _new_net(self) -> SequenceNet:
        return SequenceNet(self.feature_spec.step_dim, self.feature_spec.global_dim, int(self.params["hidden"]),
                           self.head)

    def _fit(self, schedules: Sequence[SolverSchedule], targets: np.ndarray, groups: np.ndarray) -> None:
        steps, lengths, glob = features.sequences(schedules, self.feature_spec.max_steps)
        real = np.concatenate([steps[k, : lengths[k]] for k in range(len(schedules))])
        self.norm = {"step_mean": real.mean(0).tolist(), "step_std": np.maximum(real.std(0), 1e-6).tolist(),
                     "global_mean": glob.mean(0).tolist(), "global_std": np.maximum(glob.std(0), 1e-6).tolist()}
        x_steps, x_len, x_glob = self._tensors(schedules)
        y = torch.as_tensor(targets, dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = self._new_net()
        opt = torch.optim.AdamW(self.net.parameters(), lr=float(self.params["lr"]),
                                weight_decay=float(self.params["weight_decay"]))
        # Pairs are drawn within a group: scores of different groups are never compared.
        members = [torch.as_tensor(np.flatnonzero(groups == g)) for g in np.unique(groups)]
        members = [m for m in members if len(m) > 1]
        sizes = torch.tensor([len(m) for m in members], dtype=torch.float64)
        n_pairs = int(self.params["pairs_per_step"])
        self.net.train()
        for _ in range(int(self.params["epochs"])):
            which = torch.multinomial(sizes**2, n_pairs, replacement=True, generator=gen)
            i = torch.empty(n_pairs, dtype=torch.long)
            j = torch.empty(n_pairs, dtype=torch.long)
            for g, m in enumerate(members):
                sel = which == g
                k = int(sel.sum())
                if k:
                    i[sel] = m[torch.randint(len(m), (k,), generator=gen)]
                    j[sel] = m[torch.randint(len(m), (k,), generator=gen)]
            loss = pairwise_logistic_loss(self.net(x_steps, x_len, x_glob), y, i, j)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()

    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        assert self.net is not None
        with torch.no_grad():
            return self.net(*self._tensors(schedules)).double().numpy()

    def _save_model(self, folder: Path) -> dict[str, Any]:
        assert self.net is not None
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / _WEIGHTS))
        return {"weights_file": _WEIGHTS, "norm": self.norm, "head": self.head}

    def _load_model(self, folder: Path, state: dict[str, Any]) -> None:
        if state.get("head") != self.head:
            raise ValueError(f"state.head={state.get('head')!r} does not match {self.head!r}")
        self.norm = {k: list(map(float, v)) for k, v in state["norm"].items()}
        self.net = self._new_net()
        self.net.load_state_dict(load_file(str(folder / state.get("weights_file", _WEIGHTS))))
        self.net.eval()


class TorchLSTMPredictor(_TorchSeq):
    kind = "torch-lstm"
    head = "lstm"


class TorchMLPPredictor(_TorchSeq):
    kind = "torch-mlp"
    head = "mlp"
