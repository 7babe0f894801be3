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
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return "%s,%03d" % (self._stamp, record.msecs)  # noqa: UP031  # logging's own default_msec_format


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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
