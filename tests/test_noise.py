"""NoiseStream: the integrator's noise, drawn ahead on a helper thread, is the noise of drawing in the loop."""

from __future__ import annotations

import threading

import pytest
import torch

from s3search import baselines, grids, processes
from s3search import noise as noise_mod
from s3search.integrator import sample
from s3search.noise import NoiseStream, generators_for, randn_rows


def _drawn(stream: NoiseStream, k: int) -> list[torch.Tensor]:
    with stream:
        return [stream.next() for _ in range(k)]


@pytest.mark.parametrize("ahead", [True, False])
def test_one_generator_gives_the_loops_numbers_in_order(ahead):
    like = torch.empty(50, 7)
    want = [randn_rows(like, g) for g in [torch.Generator().manual_seed(3)] for _ in range(4)]
    got = _drawn(NoiseStream(like, 4, torch.Generator().manual_seed(3), ahead=ahead), 4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,dtype", [((8, 16), torch.float32), ((1000, 64), torch.float32),
                                         ((4, 3, 4, 4), torch.float64)])
def test_one_generator_banked_gives_the_loops_numbers(shape, dtype):
    like = torch.empty(shape, dtype=dtype)
    assert noise_mod.one_draw_is_the_loops(like)
    g = torch.Generator().manual_seed(11)
    want = [randn_rows(like, g) for _ in range(5)]
    stream = NoiseStream(like, 5, torch.Generator().manual_seed(11), ahead=True)
    assert stream._banked   # noqa: SLF001 - the path under test
    for a, b in zip(_drawn(stream, 5), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("numel", [16, 48, 64000, 7, 50, 350])
def test_one_long_draw_is_the_loops_exactly_where_the_rule_says(numel):
    # The torch property the bank relies on: checked on the installed torch, both ways.
    like = torch.empty(numel)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    long = torch.randn((3, numel), generator=g1)
    short = torch.stack([torch.randn((numel,), generator=g2) for _ in range(3)])
    if noise_mod.one_draw_is_the_loops(like):
        assert torch.equal(long, short)
    else:   # the rule is not looser than torch: these sizes really differ
        assert not torch.equal(long, short)


def test_a_bank_too_large_or_unaligned_is_drawn_step_by_step(monkeypatch):
    with NoiseStream(torch.empty(50, 7), 4, torch.Generator(), ahead=True) as s:
        assert not s._banked   # noqa: SLF001
    monkeypatch.setattr(noise_mod, "BANK_MAX_BYTES", 1000)
    with NoiseStream(torch.empty(64, 16), 4, torch.Generator(), ahead=True) as s:
        assert not s._banked   # noqa: SLF001


@pytest.mark.parametrize("ahead", [True, False])
def test_per_row_generators_draw_each_rows_steps_from_its_own_generator(ahead):
    like = torch.empty(6, 3, 2)
    got = _drawn(NoiseStream(like, 3, generators_for(range(6)), ahead=ahead), 3)
    for row, g in enumerate(generators_for(range(6))):
        steps = torch.randn((3, 3, 2), generator=g)
        for j in range(3):
            assert torch.equal(got[j][row], steps[j])


def test_asking_for_more_noise_than_steps_is_an_error_and_none_is_left_drawing():
    gen = torch.Generator().manual_seed(0)
    stream = NoiseStream(torch.empty(4, 2), 1, gen)
    stream.next()
    with pytest.raises(RuntimeError, match="more noise"):
        stream.next()
    stream.close()
    # Exactly one draw was made from the generator: the stream never draws past its steps.
    ref = torch.Generator().manual_seed(0)
    torch.randn((4, 2), generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_the_global_generator_is_drawn_in_the_callers_thread():
    threads = []
    real = noise_mod.randn_rows

    def spy(like, generator):
        threads.append(threading.current_thread())
        return real(like, generator)

    noise_mod.randn_rows = spy
    try:
        _drawn(NoiseStream(torch.empty(3, 2), 2, None, ahead=True), 2)
        _drawn(NoiseStream(torch.empty(3, 2), 2, torch.Generator().manual_seed(1), ahead=True), 2)
    finally:
        noise_mod.randn_rows = real
    assert threads[:2] == [threading.current_thread()] * 2
    assert all(t is not threading.current_thread() for t in threads[2:]) and len(threads) == 4


def test_a_forked_process_gets_its_own_pool(monkeypatch):
    first = noise_mod._pool()
    assert noise_mod._pool() is first
    monkeypatch.setattr(noise_mod.os, "getpid", lambda: -1)
    assert noise_mod._pool() is not first


def test_sde_sample_is_the_same_with_and_without_drawing_ahead(monkeypatch):
    proc = processes.get("edm")
    sched = baselines.get("dpmpp_2m_sde", timesteps=list(grids.edm(proc, 6)), process="edm")
    den = lambda x, t: x / (1.0 + t * t)  # noqa: E731 - a Gaussian's exact denoiser (unit variance, mean 0)
    x_T = 80.0 * torch.randn(32, 4, generator=torch.Generator().manual_seed(9))
    ahead = [sample(den, x_T, sched, torch.Generator().manual_seed(5)),
             sample(den, x_T, sched, generators_for(range(32)))]
    monkeypatch.setattr(noise_mod, "DRAW_AHEAD", False)
    inline = [sample(den, x_T, sched, torch.Generator().manual_seed(5)),
              sample(den, x_T, sched, generators_for(range(32)))]
    for a, b in zip(ahead, inline):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,dtype", [((5, 64), torch.float32), ((4, 17), torch.float64), ((3, 3), torch.float32),
                                         ((6, 2, 1, 8), torch.float32)])
def test_per_row_draws_are_torch_randn_of_each_rows_generator(shape, dtype):
    got = randn_rows(torch.empty(shape, dtype=dtype), generators_for(range(shape[0])))
    for row, g in zip(got, generators_for(range(shape[0]))):
        assert torch.equal(row, torch.randn(shape[1:], generator=g, dtype=dtype))
    assert got.dtype == dtype and got.shape == shape


def test_per_row_fill_is_compiled_on_this_torch():
    # The compiled loop is what keeps a per-row bank off the GIL; losing it silently would bring back the
    # overhead bench/noise_handoff.py measures, so a torch without it should be noticed here.
    assert isinstance(noise_mod._row_filler(), torch.jit.ScriptFunction)


@pytest.mark.parametrize("shape", [(7, 3, 64), (5, 17), (1, 4)])
def test_compiled_and_python_fills_draw_the_same_and_leave_generators_alike(shape):
    compiled, python = torch.empty(shape), torch.empty(shape)
    g_compiled, g_python = generators_for(range(10, 10 + shape[0])), generators_for(range(10, 10 + shape[0]))
    noise_mod._row_filler()(compiled, g_compiled)
    noise_mod._fill_rows_in_python(python, g_python)
    assert torch.equal(compiled, python)
    for a, b in zip(g_compiled, g_python):
        assert torch.equal(a.get_state(), b.get_state())


def test_without_torchscript_the_fill_falls_back_to_python(monkeypatch):
    def no_script(fn):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(noise_mod, "_ROW_FILLER", None)
    monkeypatch.setattr(torch.jit, "script", no_script)
    assert noise_mod._row_filler() is noise_mod._fill_rows_in_python
    got = randn_rows(torch.empty(3, 16), generators_for(range(3)))
    for row, g in zip(got, generators_for(range(3))):
        assert torch.equal(row, torch.randn(16, generator=g))


@pytest.mark.parametrize("row_shape", [(4, 4), (64,), (3, 2)])
def test_per_row_first_step_drawn_apart_gives_the_one_draw_numbers(row_shape):
    like, steps = torch.empty((5,) + row_shape), 4
    with NoiseStream(like, steps, generators_for(range(5)), ahead=True) as s:
        staged = s._first is not None   # noqa: SLF001
        got = [s.next() for _ in range(steps)]
    assert staged == (like[0].numel() % 16 == 0)
    for row, g in enumerate(generators_for(range(5))):
        want = torch.randn((steps,) + row_shape, generator=g)
        for j in range(steps):
            assert torch.equal(got[j][row], want[j])


@pytest.mark.timeout(60)
def test_a_failed_first_step_draw_is_raised_not_waited_for():
    gens = generators_for(range(3))
    with pytest.raises((TypeError, RuntimeError)):   # TorchScript's argument check, or Python's
        with NoiseStream(torch.empty(3, 16), 3, gens[:2] + ["not a generator"], ahead=True) as s:
            s.next()
