"""Secret redaction: configured secrets never leave the process in logs, errors or traces.

Dependency-free so that :mod:`service.api.status` (errors to callers), the servicer (attempt
messages), telemetry (span status) and the log-record hook can all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
MIN_REDACTED_CHARS = 8  # shorter values would blank out ordinary words; such keys are warned about anyway
_secrets: tuple[str, ...] = ()  # longest first, so a secret containing another is replaced whole
_log_hook_installed = False


def register_secrets(values: Iterable[str]) -> None:
    """Adds values for :func:`redact` to blank out, and makes sure log records are redacted."""
    global _secrets
    merged = set(_secrets) | {v for v in values if len(v) >= MIN_REDACTED_CHARS}
    _secrets = tuple(sorted(merged, key=len, reverse=True))
    if _secrets:
        _install_log_redaction()


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[REDACTED]`` (the same object if none)."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _install_log_redaction() -> None:
    """Wraps the log record factory once per process: it sees every record of every logger,
    whichever handlers are attached later (the CLI's, pytest's, an exporter's)."""
    global _log_hook_installed
    if _log_hook_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _secrets:
            _scrub(record)
        return record

    logging.setLogRecordFactory(factory)
    _log_hook_installed = True


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it for logging to report
        return
    clean = redact(message)
    if clean is not message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        # Tracebacks are formatted late, by the handler; format (and clean) this one now. Rare.
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        if clean is not text:
            record.exc_text = clean
