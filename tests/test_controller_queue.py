from __future__ import annotations

import threading

from kubetune.controller.queue import WorkQueue


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
