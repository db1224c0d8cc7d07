"""Per-sample seeds: (base seed, split, sample index) -> a torch seed, distinct and stable.

torch's CPU generator keeps only the low 32 bits of a seed (mt19937 is seeded from a uint32), so seeds that
differ only above bit 31 give the same stream. Every seed here is therefore below 2**32: the top two bits name
the split and the low 30 bits are a bijective scramble of (offset(base) + index) mod 2**30. Hence

- within one (base, split), indices 0 .. 2**30 - 1 get distinct seeds;
- the "search", "test", "validation" and "reference" splits can never share a seed, whatever the base seeds.
"""

from __future__ import annotations

import hashlib

__all__ = ["SPLITS", "EVAL_SPLITS", "MAX_INDEX", "sample_seed", "sample_seeds", "reference_seed"]

SPLITS = {"search": 0, "test": 1, "reference": 2, "validation": 3}
# The splits a schedule is evaluated on; the position is the index of its reference draw (kept stable so that
# reference caches made before "validation" existed stay valid).
EVAL_SPLITS = ("search", "test", "validation")
_BITS = 30
_MASK = (1 << _BITS) - 1
MAX_INDEX = 1 << _BITS


def _offset(base: int) -> int:
    # Different bases start at unrelated points of the 2**30 cycle.
    return int.from_bytes(hashlib.blake2b(str(int(base)).encode(), digest_size=8).digest(), "little") & _MASK


def _scramble(x: int) -> int:
    # A bijection of [0, 2**30): odd multipliers and xor-shifts are each invertible modulo 2**30.
    x = (x * 0x2C1B3C6D) & _MASK
    x ^= x >> 15
    x = (x * 0x297A2D39) & _MASK
    x ^= x >> 13
    return x


def sample_seed(base: int, split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_INDEX:
        raise ValueError(f"index={index!r} must be an integer in [0, 2**30)")
    if isinstance(base, bool) or not isinstance(base, int):
        raise ValueError(f"seed={base!r} must be an integer")
    return (SPLITS[split] << _BITS) | _scramble((_offset(base) + index) & _MASK)


def sample_seeds(base: int, split: str, n: int, start: int = 0) -> list[int]:
    """Seeds of samples start .. start + n - 1."""
    if n < 0 or start < 0 or start + n > MAX_INDEX:
        raise ValueError(f"n={n!r}, start={start!r}: indices must lie in [0, 2**30)")
    return [sample_seed(base, split, start + i) for i in range(n)]


def reference_seed(base: int, split: str = "search") -> int:
    """The seed of the single generator that draws the reference samples used with `split`."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(EVAL_SPLITS)}")
    return sample_seed(base, "reference", EVAL_SPLITS.index(split))
