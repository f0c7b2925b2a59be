"""One logging configuration for every process and all three sources of log lines in it.

Our own loggers (``kafka_backup.*``), Faust and mode (which clear the root logger's handlers
and apply a ``logging.config.dictConfig`` when their worker starts: :func:`dict_config` is
handed to ``faust.Worker(logging_config=...)`` so it applies ours), and librdkafka (whose
lines reach Python logging through the ``logger`` setting that ``schemas.kafka_admin``
puts on every client). ``log.format: json`` writes one JSON object a line
(python-json-logger) with ``time`` (ISO 8601 with zone), ``level``, ``logger``, ``message``
and the ``job``/``instance`` of the process where known.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import logging.config
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LONG_RUNNING_LEVEL = "INFO"
ONE_SHOT_LEVEL = "WARNING"

_context: dict[str, str] = {}


def set_context(**fields: str) -> None:
    """``job``/``instance`` of this process, added to every JSON line from now on."""
    _context.update({k: v for k, v in fields.items() if v})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
            return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")

        def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                       message_dict: dict[str, Any]) -> None:
            super().add_fields(log_record, record, message_dict)
            for key in _context:
                log_record.setdefault(key, getattr(record, key, _context[key]))

    return Formatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                     rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})


def dict_config(level: str, fmt: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of every process (stderr, one handler on the root logger)."""
    formatter: dict[str, Any] = ({"()": _json_formatter} if fmt == "json" else {"format": TEXT_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": "default", "filters": ["context"], "level": level}},
        "root": {"level": level, "handlers": ["default"]},
    }


def configure(level: str, fmt: str) -> dict[str, Any]:
    """Apply :func:`dict_config` now; returned so Faust can apply the same again when it starts."""
    config = dict_config(level, fmt)
    logging.config.dictConfig(copy.deepcopy(config))  # dictConfig consumes what it is given
    logging.captureWarnings(True)
    return config


class FirstOfEach:
    """Log an unexpected exception's traceback the first time each distinct error is seen.

    An error is its type and where it was raised (the innermost frame's file and line), not its
    message, which often holds per-record data: a bug hit by every record of a flood logs one
    traceback, and the caller counts every occurrence in a metric. At most ``limit`` distinct
    errors are remembered; past that each is logged once more after the memory is cleared.
    """

    def __init__(self, logger: logging.Logger, limit: int = 1000) -> None:
        self._log = logger
        self._limit = limit
        self._seen: set[tuple[str, str, str, int]] = set()

    @staticmethod
    def key(err: BaseException, about: str = "") -> tuple[str, str, str, int]:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)
        return (about, type(err).__qualname__, *where)

    def exception(self, err: BaseException, msg: str, *args: object, about: str = "") -> bool:
        """Log ``msg`` with ``err``'s traceback if this error (of ``about``) is new; True when logged."""
        key = self.key(err, about)
        if key in self._seen:
            return False
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(key)
        self._log.error(msg + " (the first of its kind: later ones are counted, not logged)", *args,
                        exc_info=(type(err), err, err.__traceback__))
        return True
