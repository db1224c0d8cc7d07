"""Noise for stochastic steps, drawn so a sample is the same whatever batch it lands in.

Pass one generator per sample row (`generators_for(seeds)`) for batch-invariant results; a single generator
is accepted for convenience and then draws the whole batch at once.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["GeneratorArg", "generators_for", "randn_rows"]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


def generators_for(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent generator per sample row."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn_rows(like: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    """Standard normal noise shaped like `like`; row i comes from generator[i] when a list is given."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"generator has {len(generator)} entries; the batch has {like.shape[0]} rows")
    row_shape = like.shape[1:]
    return torch.stack([torch.randn(row_shape, generator=g, dtype=like.dtype, device=like.device)
                        for g in generator])
