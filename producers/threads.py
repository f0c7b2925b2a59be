"""Work started in a daemon thread, its outcome taken later where it is needed."""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


def in_daemon_thread(work: Callable[[], T], name: str) -> Future[T]:
    """Run ``work`` in a daemon thread of its own; its result, or what it raised, in the returned future
    (raised again by ``result()``, where the caller would have met it running the work itself).

    A daemon thread, not a pool's: a process that ends while the work hangs (a dead coordinator, a
    storage call that does not answer) does not wait for it.
    """
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as err:  # handed to whoever takes the result
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class ReadAhead(Generic[K, T]):
    """Reads started ahead of their use, in the order they will be used.

    ``plan`` names the items to be read next, in order; their reads run each in a daemon thread of its
    own (:func:`in_daemon_thread`), ``concurrency`` at a time and, beyond the first, up to ``max_bytes``
    of them (``size``) under way or done and not yet taken. ``take`` hands out the head's read and starts
    the next; its outcome (what ``read`` returned or raised) comes out of the future, where the caller
    would have met it reading then. Items ``skip`` says need no read (already at hand) are passed over.
    The restore's segments and ``verify``'s are read this way: one after the other, each waited a round
    trip to the storage while nothing else happened.
    """

    def __init__(self, read: Callable[[K], T], size: Callable[[K], int], concurrency: int, max_bytes: int,
                 name: str, skip: Callable[[K], bool] = lambda item: False) -> None:
        self.read, self.size, self.skip = read, size, skip
        self.concurrency, self.max_bytes, self.name = max(1, concurrency), max_bytes, name
        self._plan: deque[K] = deque()  # to read next, in order, not started yet
        self._ahead: deque[tuple[K, Future[T]]] = deque()  # started, in order
        self._bytes = 0  # size of what is in _ahead

    def plan(self, items: Iterable[K]) -> None:
        """Read ``items`` next, in this order (what was planned before and not taken is forgotten)."""
        self.drop()
        self.extend(items)

    def extend(self, items: Iterable[K]) -> None:
        """Read ``items`` after what is planned already."""
        self._plan.extend(items)
        self._fill()

    def head(self) -> K | None:
        """The item :meth:`take` hands out next; None when nothing is planned."""
        return self._ahead[0][0] if self._ahead else self._plan[0] if self._plan else None

    def under_way(self) -> list[K]:
        """The items whose reads have started and were not taken yet, in order."""
        return [item for item, _ in self._ahead]

    def take(self, item: K) -> Future[T] | None:
        """The read of ``item`` if it is the head (and the next one is started); None otherwise."""
        if not self._ahead or self._ahead[0][0] != item:
            return None
        _, reading = self._ahead.popleft()
        self._bytes -= self.size(item)
        self._fill()
        return reading

    def drop(self) -> None:
        """Forget the plan; reads under way finish in their threads, unused."""
        self._plan.clear()
        self._ahead.clear()
        self._bytes = 0

    def _fill(self) -> None:
        while self._plan:
            item = self._plan[0]
            if self.skip(item):
                self._plan.popleft()
                continue
            if self._ahead and (len(self._ahead) >= self.concurrency
                                or self._bytes + self.size(item) > self.max_bytes):
                return
            self._plan.popleft()
            self._ahead.append((item, in_daemon_thread(functools.partial(self.read, item), self.name)))
            self._bytes += self.size(item)
