"""Secret redaction: configured secrets never leave the process in logs, errors or traces.

Two rules, applied by :func:`redact`:

* every registered secret (API keys, upstream credentials, OTLP header values), whatever its
  length, is replaced by ``[REDACTED]``: a short key is still a key;
* the userinfo of any URL (``https://user:password@host``) is removed, so a credential written
  into a base URL never reaches Health, spans or logs.

Dependency-free so that :mod:`service.api.status` (errors to callers), the servicer (attempt
messages), telemetry (span status) and the log-record hook can all use it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_secrets: tuple[str, ...] = ()  # longest first, so a secret containing another is replaced whole
_log_hook_installed = False
# scheme://userinfo@ : the userinfo has no '/', '@' or whitespace (RFC 3986 authority).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def register_secrets(values: Iterable[str]) -> None:
    """Adds values for :func:`redact` to blank out, and makes sure log records are redacted."""
    global _secrets
    merged = set(_secrets) | {v for v in values if v}
    _secrets = tuple(sorted(merged, key=len, reverse=True))
    _install_log_redaction()


def url_secrets(url: str) -> list[str]:
    """The credentials written into ``url`` (user and password of its userinfo), for registration."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [unquote(v) for v in (parts.username, parts.password) if v]
    return found + [v for v in (parts.username, parts.password) if v]


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@`` (unchanged when it has none or does not parse)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(r"\g<scheme>", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact(text: str) -> str:
    """``text`` with every registered secret and URL userinfo removed (the same object if none)."""
    if "@" in text and "://" in text:
        cleaned = _USERINFO.sub(r"\g<scheme>", text)
        if cleaned != text:
            text = cleaned
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
