"""A worker thread of the exporter's: started once, stopped on the way out, never holding the process up."""

from __future__ import annotations

import threading
from typing import Self


class Background:
    """Runs :meth:`_run` in a daemon thread named ``thread_name``; ``_run`` returns once ``_stop`` is set."""

    thread_name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError
