"""A work queue with client-go's semantics: a key is processed by one worker at a time, events that arrive
while it is processed are folded into one more pass, and failures come back with exponential back-off.

Delayed adds are merged per key: a key has at most one pending timer, the earliest asked for. (Each pass
asks to be looked at again; without merging, the timers of every pass would stack up, and a key would
come back as often as it had been processed.)"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Hashable


class WorkQueue:
    def __init__(self, base_delay: float = 0.5, max_delay: float = 300.0) -> None:
        self._cv = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []
        # The one pending timer of each key; heap entries that do not match it are stale.
        self._due: dict[Hashable, float] = {}
        self._seq = 0
        self._failures: dict[Hashable, int] = {}
        self._base, self._max = base_delay, max_delay
        self._shutdown = False

    def add(self, key: Hashable, *, urgent: bool = False) -> None:
        """Queue `key` (once, however often it is added before a worker takes it). An urgent key goes
        to the front, ahead of a backlog: a run that just finished is reported while a burst of new
        ones is still being created."""
        with self._cv:
            if self._shutdown:
                return
            if key in self._dirty:
                if urgent and key not in self._processing and self._queue and self._queue[0] != key:
                    self._queue.remove(key)
                    self._queue.appendleft(key)
                return
            self._dirty.add(key)
            if key not in self._processing:
                if urgent:
                    self._queue.appendleft(key)
                else:
                    self._queue.append(key)
                self._cv.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        """Add `key` after `delay` seconds, unless an earlier timer for it is pending already."""
        with self._cv:
            due = time.monotonic() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, key))
            self._cv.notify_all()

    def add_rate_limited(self, key: Hashable) -> float:
        """Requeue after a failure: base x 2^failures, capped."""
        with self._cv:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        delay = float(min(self._base * 2**n, self._max))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        with self._cv:
            self._failures.pop(key, None)

    def get(self) -> Hashable | None:
        """The next key to process, or None once shut down."""
        with self._cv:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    due, _, key = heapq.heappop(self._delayed)
                    if self._due.get(key) != due:
                        continue  # replaced by an earlier timer, which has fired already
                    del self._due[key]
                    if key not in self._dirty:
                        self._dirty.add(key)
                        if key not in self._processing:
                            self._queue.append(key)
                if self._shutdown:
                    return None
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._cv.wait(timeout)

    def done(self, key: Hashable) -> None:
        with self._cv:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._shutdown = True
            self._cv.notify_all()

    def pending_timers(self) -> int:
        with self._cv:
            return len(self._due)

    def __len__(self) -> int:
        with self._cv:
            return len(self._queue)
