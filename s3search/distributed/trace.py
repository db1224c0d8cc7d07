"""Where a Ray worker's time goes during one evaluate() call: inside the evaluator, or one of Ray's gaps.

The driver stamps when it hands a task to an actor and when it gets the result back; the actor stamps when it
starts and finishes the task. All four are wall-clock times (time.time()), so they only line up when the
driver and the actor share a host, as on an embedded Ray; on a cluster the dispatch and fetch parts absorb
the hosts' clock offset. With one task in flight per actor the parts add up exactly to the window:

    window = head + inside + dispatch + fetch + driver + tail     (for every actor)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["TaskTrace", "Breakdown", "breakdown", "next_batch_size"]


@dataclass(frozen=True)
class TaskTrace:
    actor: int
    size: int            # candidates in the task
    submitted: float     # driver: just before .remote()
    started: float       # actor: entering evaluate_json
    finished: float      # actor: results ready, before they are serialised
    received: float      # driver: ray.wait returned the task


@dataclass(frozen=True)
class Breakdown:
    """Seconds of worker time, summed over actors. Everything but `inside` is what Ray and the loop cost."""

    inside: float = 0.0
    dispatch: float = 0.0   # submitted -> started: Ray delivering the task to the actor
    fetch: float = 0.0      # finished -> received: serialising the result and the driver waking up for it
    driver: float = 0.0     # received -> next submitted (and window start -> first submitted): the loop
    tail: float = 0.0       # last received -> window end: the actor idle while others finish

    @property
    def outside(self) -> float:
        return self.dispatch + self.fetch + self.driver + self.tail


def breakdown(trace: Iterable[TaskTrace], start: float, end: float, actors: int) -> Breakdown:
    """Split actors x (end - start) into the parts above; an actor that got no task counts as tail."""
    by_actor: dict[int, list[TaskTrace]] = {}
    for t in trace:
        if start <= t.submitted and t.received <= end:
            by_actor.setdefault(t.actor, []).append(t)
    inside = dispatch = fetch = driver = tail = 0.0
    for tasks in by_actor.values():
        tasks.sort(key=lambda t: t.submitted)
        driver += tasks[0].submitted - start
        for prev, nxt in zip(tasks, tasks[1:]):
            driver += nxt.submitted - prev.received
        for t in tasks:
            inside += t.finished - t.started
            dispatch += t.started - t.submitted
            fetch += t.received - t.finished
        tail += end - tasks[-1].received
    tail += (actors - len(by_actor)) * (end - start)
    return Breakdown(inside, dispatch, fetch, driver, tail)


def next_batch_size(remaining: int, cap: int, actors: int) -> int:
    """Candidates for the next task: at most `cap`, and never more than an even share of what is left.

    Guided self-scheduling: batches shrink as the queue drains, so the last tasks are single candidates and
    the actors finish within about one evaluation of each other, even when one of them runs slower (a
    shared core). Fixed batches of `cap` can leave one actor a whole batch behind: 24 candidates in batches
    of 5 over 2 actors is 3 rounds against 2.
    """
    if remaining <= 0:
        return 0
    share = -(-remaining // max(1, actors))
    return max(1, min(cap, share))
