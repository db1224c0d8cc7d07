"""The per-task trace split and the guided batch sizes (pure functions; no Ray needed)."""

from __future__ import annotations

import pytest

from s3search.distributed.trace import TaskTrace, breakdown, next_batch_size


def test_breakdown_adds_up_to_workers_times_the_window():
    trace = [
        # actor 0: two tasks, 0.1 s dispatch / 0.05 s fetch each, 0.2 s of loop between them, idle at the end
        TaskTrace(0, 2, submitted=10.0, started=10.1, finished=11.1, received=11.15),
        TaskTrace(0, 1, submitted=11.35, started=11.45, finished=12.0, received=12.05),
        # actor 1: one long task that ends the window
        TaskTrace(1, 3, submitted=10.2, started=10.25, finished=12.9, received=13.0),
        # outside the window: ignored
        TaskTrace(1, 1, submitted=5.0, started=5.1, finished=6.0, received=6.1),
    ]
    b = breakdown(trace, start=10.0, end=13.0, actors=3)
    assert b.inside == pytest.approx(1.0 + 0.55 + 2.65)
    assert b.dispatch == pytest.approx(0.1 + 0.1 + 0.05)
    assert b.fetch == pytest.approx(0.05 + 0.05 + 0.1)
    assert b.driver == pytest.approx(0.0 + 0.2 + 0.2)
    # actor 0 idles 0.95 s at the end; actor 2 got nothing, so its whole window is tail
    assert b.tail == pytest.approx(0.95 + 0.0 + 3.0)
    assert b.inside + b.outside == pytest.approx(3 * 3.0)


def test_guided_batches_shrink_to_single_candidates_and_respect_the_cap():
    def drain(n: int, cap: int, actors: int) -> list[int]:
        sizes = []
        while n:
            sizes.append(next_batch_size(n, cap, actors))
            n -= sizes[-1]
        return sizes

    assert drain(24, 7, 2) == [7, 7, 5, 3, 1, 1]
    assert drain(24, 1, 2) == [1] * 24
    assert drain(10, 100, 2) == [5, 3, 1, 1]
    assert drain(3, 5, 4) == [1, 1, 1]
    assert max(drain(1000, 13, 2)) == 13 and sum(drain(1000, 13, 2)) == 1000
    assert next_batch_size(0, 5, 2) == 0
