"""Work started in a daemon thread, its outcome taken later where it is needed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

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
