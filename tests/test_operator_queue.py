from __future__ import annotations

import threading

from kubetune_operator.queue import WorkQueue


def test_a_key_is_queued_once_and_refolded_while_processing() -> None:
    q = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    assert q.get() == "a"
    q.add("a")  # an event while "a" is processed: one more pass, after this one
    assert q.get() == "b"
    q.done("b")
    q.done("a")
    assert q.get() == "a"


def test_backoff_doubles_and_forget_resets() -> None:
    q = WorkQueue(base_delay=0.01, max_delay=0.04)
    assert [q.add_rate_limited("k") for _ in range(4)] == [0.01, 0.02, 0.04, 0.04]
    q.forget("k")
    assert q.add_rate_limited("k") == 0.01


def test_delayed_keys_come_back_and_shutdown_wakes_workers() -> None:
    q = WorkQueue()
    q.add_after("later", 0.05)
    assert q.get() == "later"
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shutdown()
    t.join(timeout=5)
    assert got == [None]


def test_delayed_adds_of_one_key_merge_into_the_earliest() -> None:
    q = WorkQueue()
    for delay in (30.0, 30.0, 10.0, 60.0):  # every pass asks again: one timer stays, the earliest
        q.add_after("k", delay)
    q.add_after("other", 30.0)
    assert q.pending_timers() == 2
    q.add_after("k", 0.01)  # sooner wins
    assert q.get() == "k"
    assert q.pending_timers() == 1  # the later timers of "k" are gone, not just postponed
    q.done("k")
    q.add_after("k", 0.02)
    assert q.get() == "k"


def test_an_urgent_key_goes_ahead_of_the_backlog_and_is_still_queued_once() -> None:
    q = WorkQueue()
    for key in ("a", "b", "c"):
        q.add(key)
    q.add("d", urgent=True)  # new: to the front
    q.add("c", urgent=True)  # queued already: moved to the front, not queued twice
    q.add("c", urgent=True)
    assert [q.get() for _ in range(4)] == ["c", "d", "a", "b"]
    assert len(q) == 0
    # A key being processed is not queued ahead of itself: it comes back once, after done().
    q.add("e", urgent=True)
    for key in ("c", "d", "a", "b"):
        q.done(key)
    assert q.get() == "e"
    q.add("e", urgent=True)
    assert len(q) == 0
    q.done("e")
    assert q.get() == "e"
