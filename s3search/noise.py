"""Noise for stochastic steps, drawn so a sample is the same whatever batch it lands in.

Pass one generator per sample row (`generators_for(seeds)`) for batch-invariant results; a single generator
is accepted for convenience and then draws the whole batch at once.

`NoiseStream` hands the integrator its noise in step order. On CPU it draws ahead on a helper thread while the
model runs: torch's normal generator costs about 3.4 ns a number, 5% of a small MLP's evaluation for 64-d data,
and the draw does not depend on the model's output. The numbers and their order are exactly those of drawing in
the loop: each generator is used by one thread at a time, in the same sequence.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Union

import torch

__all__ = ["GeneratorArg", "generators_for", "randn_rows", "NoiseStream"]

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
    # Filled in place row by row: the same numbers as torch.randn(row_shape, generator=g) per row, without a
    # fresh tensor per row and the stack's copy.
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    _row_filler()(out, list(generator))
    return out


def _fill_rows_in_python(out: torch.Tensor, generators: list[torch.Generator]) -> None:
    for row, g in zip(out, generators):
        row.normal_(generator=g)


def _fill_rows_source(out: torch.Tensor, generators: List[torch.Generator]) -> None:
    for i in range(len(generators)):
        out[i].normal_(generator=generators[i])


_ROW_FILLER: Optional[Callable[[torch.Tensor, list], None]] = None
_ROW_FILLER_LOCK = threading.Lock()


def _row_filler() -> Callable[[torch.Tensor, list], None]:
    """The per-row fill, compiled by TorchScript where this torch still has it, else the Python loop.

    The same calls on the same views, so the same numbers; compiled, the loop runs without the GIL. From Python,
    1000 rows are 1000 interpreter round trips, and a model running on another thread waits for the GIL at each
    of its ops: a small MLP's call took 3.0-3.3 ms alone, 3.7-4.2 ms beside a Python fill and 3.1-3.5 ms beside
    the compiled one (bench/noise_handoff.py).
    """
    global _ROW_FILLER
    if _ROW_FILLER is not None:   # every per-row draw asks: no lock once it is built
        return _ROW_FILLER
    with _ROW_FILLER_LOCK:
        if _ROW_FILLER is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # torch.jit.script is deprecated, not yet replaced for this
                    _ROW_FILLER = torch.jit.script(_fill_rows_source)
            except Exception:   # noqa: BLE001 - no TorchScript (or no source to compile): same numbers, slower
                _ROW_FILLER = _fill_rows_in_python
        return _ROW_FILLER


# Draw on the helper thread where there is a second core to draw on; False draws in the caller's thread (the
# benchmark compares both).
DRAW_AHEAD = (os.cpu_count() or 1) > 1
# One generator: every step's noise in one draw when that gives the loop's numbers and the bank stays small.
# Each hand-off to the helper thread costs ~50 us of the model's thread on this 2-vCPU machine (a small MLP's
# step is ~2.5 ms), so one hand-off per sample beats one per step.
BANK_MAX_BYTES = 64 << 20
_POOL: Optional[tuple[int, ThreadPoolExecutor]] = None
_POOL_LOCK = threading.Lock()


def one_draw_is_the_loops(like: torch.Tensor) -> bool:
    """Whether torch.randn((k,) + shape) on one CPU generator gives the numbers of k draws of `shape` in turn.

    torch's CPU normal sampler fills a contiguous float tensor of n >= 16 numbers with uniforms in order and
    transforms them in blocks of 16, redoing the last block when 16 does not divide n; with n a multiple of 16
    the blocks of one long draw fall where k short draws put theirs (tests/test_noise.py checks it on this torch).
    """
    n = like.numel()
    return like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64) and n >= 16 and n % 16 == 0


def _pool() -> ThreadPoolExecutor:
    # One pool per process: a pool inherited through fork (Ray, multiprocessing) has no live threads.
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3search-noise"))
        return _POOL[1]


class NoiseStream:
    """The noise of a sample's `steps` stochastic steps, one tensor shaped like `like` per `next()` call.

    One generator per row: every row's noise for all steps is drawn in one call per row (drawing per step
    costs batch x steps generator calls), on the helper thread when `ahead`, with the first step's rows drawn
    before the rest where that gives the same numbers. One generator:
    every step's noise in one draw on the helper thread where `one_draw_is_the_loops` and the bank fits
    `BANK_MAX_BYTES`, else step j + 1's noise drawn while step j runs. No generator (torch's global one) or a
    device other than the CPU: drawn when asked, since the model may use the global generator and devices queue their own work.
    `ahead=None` follows the module's `DRAW_AHEAD`.
    Call `close()` (or use it as a context manager) so no draw is left using a generator after the sample.
    """

    def __init__(self, like: torch.Tensor, steps: int, generator: GeneratorArg, ahead: Optional[bool] = None
                 ) -> None:
        self._like, self._left, self._generator = like, steps, generator
        self._per_row = not isinstance(generator, (torch.Generator, type(None)))
        ahead = DRAW_AHEAD if ahead is None else ahead
        self._ahead = ahead and generator is not None and like.device.type == "cpu" and steps > 0
        self._bank: Optional[list[torch.Tensor]] = None
        self._pending: Optional[Future] = None
        self._banked = self._per_row
        self._first: Optional[Future] = None
        if steps > 1 and self._per_row and self._ahead and like.shape[0] > 0 and one_draw_is_the_loops(like[0]):
            self._first = Future()
            self._pending = self._start(lambda: self._draw_first_then_bank(steps))
        elif steps > 0 and self._per_row:
            self._pending = self._start(lambda: self._draw_bank(steps))
        elif self._ahead and steps > 1 and one_draw_is_the_loops(like) \
                and steps * like.numel() * like.element_size() <= BANK_MAX_BYTES:
            self._pending = self._start(lambda: self._draw_bank(steps))
            self._banked = True
        elif self._ahead:
            self._pending = self._start(self._draw_one)

    def _start(self, fn: Callable[[], object]) -> Future:
        if self._ahead:
            return _pool().submit(fn)
        done: Future = Future()
        done.set_result(fn())
        return done

    def _draw_one(self) -> torch.Tensor:
        return randn_rows(self._like, self._generator)

    def _draw_first_then_bank(self, steps: int) -> list[torch.Tensor]:
        # The first step is wanted after one model call, before a whole per-row bank is drawn; rows drawn step 0
        # and then steps 1.. give the numbers of one draw per row wherever one_draw_is_the_loops holds for a row.
        assert self._first is not None
        try:
            self._first.set_result(randn_rows(self._like, self._generator))
        except BaseException as exc:
            self._first.set_exception(exc)
            raise
        return self._draw_bank(steps - 1)

    def _draw_bank(self, steps: int) -> list[torch.Tensor]:
        like = self._like
        if not self._per_row:
            return list(randn_rows(like.new_empty((steps,) + tuple(like.shape)), self._generator).unbind(0))
        bank = randn_rows(like.new_empty((like.shape[0], steps) + tuple(like.shape[1:])), self._generator)
        return list(bank.transpose(0, 1).contiguous().unbind(0))

    def next(self) -> torch.Tensor:
        if self._left <= 0:
            raise RuntimeError("the schedule asked for more noise than its stochastic steps")
        self._left -= 1
        if self._banked:
            if self._first is not None:
                z, self._first = self._first.result(), None
                return z
            if self._bank is None:
                self._bank, self._pending = self._pending.result(), None
            return self._bank.pop(0)
        if self._pending is None:
            return self._draw_one()
        z, self._pending = self._pending.result(), None
        if self._left > 0:
            self._pending = self._start(self._draw_one)
        return z

    def close(self) -> None:
        if self._pending is not None:
            self._pending.exception()   # waits; a failed draw past the sample's end is of no use to anyone
            self._pending = None

    def __enter__(self) -> "NoiseStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
