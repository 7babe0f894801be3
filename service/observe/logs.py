"""Log output: ``LOG_FORMAT=text`` (default, for humans) or ``json`` (one JSON object per line).

In JSON every record is one object: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
and ``exception`` when there is one. Records that carry structured fields (the access log and the
audit log pass ``extra={"fields": {...}}``) have those fields at the top level instead of a
message that is itself JSON, so a log pipeline reads them without parsing twice.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
