"""Log output: ``LOG_FORMAT=text`` (default, for humans) or ``json`` (one JSON object per line).

In JSON every record is one object: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
and ``exception`` when there is one. Records that carry structured fields (the access log and the
audit log pass ``extra={"fields": {...}}``) have those fields at the top level instead of a
message that is itself JSON, so a log pipeline reads them without parsing twice.

Lines reach stderr in batches (:class:`BatchingHandler`): an INFO line (the access log writes
one per RPC) waits at most ``LOG_FLUSH_INTERVAL_S`` (0.1 s) and goes out with the others in one
write; a WARNING or worse goes out at once with everything before it; a normal exit or SIGTERM
flushes what is left. A process killed with SIGKILL loses at most the last 0.1 s of INFO lines.
One ``write`` per line was ~5 % of a unary call's CPU at 1,000 calls/s (bench/profile.md).
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson

from service.guard.redaction import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_INTERVAL_S = 0.1
_MAX_PENDING_CHARS = 256 * 1024


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with the time formatted once per second (strftime per line was ~1 % of a call)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # logging's name
        """``YYYY-mm-dd HH:MM:SS,mmm`` in local time, as logging's default."""
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        return "%s,%03d" % (self._stamp, msecs)  # noqa: UP031  # logging's own default_msec_format

    def line(self, created: float, levelname: str, name: str, message: str, fields: dict[str, Any]) -> str:
        """What :meth:`format` makes of a record with these values (no exception), without one."""
        return f"{self._time(created, _msecs(created))} {levelname} {name}: {redact(message)}"


def _msecs(created: float) -> float:
    return int((created - int(created)) * 1000) + 0.0  # as logging.LogRecord computes it


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches: INFO and below within ``interval_s``,
    WARNING and above at once (with everything queued before them), all of it on close."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = FLUSH_INTERVAL_S) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._pending: list[str] = []
        self._chars = 0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queues the formatted line (called with the handler's lock held)."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._chars += len(line)
        if record.levelno >= logging.WARNING or self._chars > _MAX_PENDING_CHARS:
            self._write()

    def emit_line(self, levelname: str, name: str, message: str, fields: dict[str, Any]) -> None:
        """Queues the line a record with these values would make, without making the record (the
        access log's path: a LogRecord through logging's machinery cost ~25 us per call).
        Only for INFO lines; only when :func:`sole_handler` says no other handler would see it."""
        line = self.formatter.line(time.time(), levelname, name, message, fields)  # type: ignore[union-attr]
        with self.lock:  # type: ignore[union-attr]  # created in __init__
            self._pending.append(line)
            self._chars += len(line)
            if self._chars > _MAX_PENDING_CHARS:
                self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._chars = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or broken stderr: nothing useful left to do with the lines
            pass

    def flush(self) -> None:
        """Writes everything queued."""
        with self.lock:  # type: ignore[union-attr]  # created in __init__
            self._write()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._pending:
                self.flush()

    def close(self) -> None:
        """Flushes and stops the flusher thread."""
        self._stop.set()
        self.flush()
        super().close()


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return orjson.dumps(out, default=str).decode()

    def line(self, created: float, levelname: str, name: str, message: str, fields: dict[str, Any]) -> str:
        """What :meth:`format` makes of a record with these values and ``fields`` (no exception)."""
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": levelname,
            "logger": name,
        }
        out.update(fields)
        return orjson.dumps(out, default=str).decode()


_installed: BatchingHandler | None = None


def sole_handler(logger: logging.Logger) -> BatchingHandler | None:
    """The installed :class:`BatchingHandler` when it is the only handler (and there is no filter)
    on ``logger``'s way to the root; then a line may skip the LogRecord (:meth:`BatchingHandler.emit_line`)
    and come out the same. None when anything else listens: a test's capture, another handler."""
    sink = _installed
    if sink is None:
        return None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers = current.handlers
        if handlers:
            return sink if len(handlers) == 1 and handlers[0] is sink and current.parent is None else None
        if not current.propagate:
            return None
        current = current.parent
    return None


def configure_logging(level: str, fmt: str) -> None:
    """Installs the root handler on stderr in ``fmt`` (``text`` or ``json``) at ``level``."""
    # The gateway owns its process: records need no thread, process or caller-frame lookups
    # (logging's documented switches; findCaller walks the stack, getpid is a syscall).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented in the logging HOWTO ("Optimization")
    handler = BatchingHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    global _installed
    _installed = handler
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
