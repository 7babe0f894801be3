"""The batching log handler: INFO lines within the flush interval, WARNING at once, all on close."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from service.observe.logs import BatchingHandler, TextFormatter


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.logs.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_info_lines_are_batched_and_reach_the_stream_within_the_interval() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval_s=0.05)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = _logger(handler)
    try:
        log.info("one")
        log.info("two")
        assert stream.getvalue() == ""  # queued, not yet written
        deadline = time.monotonic() + 5
        while stream.getvalue() != "one\ntwo\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "one\ntwo\n"  # one write, in order
    finally:
        handler.close()


def test_a_warning_goes_out_at_once_with_everything_before_it() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval_s=60)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = _logger(handler)
    try:
        log.info("before")
        log.warning("now")
        assert stream.getvalue() == "INFO before\nWARNING now\n"
    finally:
        handler.close()


def test_close_writes_what_is_queued() -> None:
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval_s=60)
    log = _logger(handler)
    log.info("last words")
    handler.close()
    assert stream.getvalue() == "last words\n"


def test_text_time_is_formatted_like_loggings_default() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    ours = TextFormatter().formatTime(record)
    assert ours == logging.Formatter().formatTime(record)
    assert TextFormatter().format(record) == logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ).format(record)


def _installed(fmt: str, stream: io.StringIO) -> BatchingHandler:
    import service.observe.logs as logs

    handler = BatchingHandler(stream, interval_s=60)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_access_logs_direct_line_is_the_line_logging_would_write(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.guard.redaction import register_secrets

    register_secrets(["sk-test-secret-1234"])
    fields = {"event": "rpc", "method": "Chat", "note": "key sk-test-secret-1234", "n": 3}
    message = json.dumps(fields)
    via_logging, direct = io.StringIO(), io.StringIO()
    a, b = _installed(fmt, via_logging), _installed(fmt, direct)
    logger = _logger(a)
    try:
        logger.info(message, extra={"fields": fields})
        b.emit_line("INFO", logger.name, message, fields)
    finally:
        a.close()
        b.close()
    got, want = direct.getvalue(), via_logging.getvalue()
    if fmt == "json":  # the time differs by the microseconds between the two calls; the rest must not
        got_obj, want_obj = json.loads(got), json.loads(want)
        assert got_obj.pop("time")[:16] == want_obj.pop("time")[:16]
        assert got_obj == want_obj
    else:
        assert got.split(" ", 2)[2] == want.split(" ", 2)[2]  # after the date and time
        assert "sk-test-secret-1234" not in got


def test_the_direct_path_is_taken_only_when_nothing_else_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.observe.logs as logs

    root = logging.getLogger()
    sink = BatchingHandler(io.StringIO(), interval_s=60)
    monkeypatch.setattr(logs, "_installed", sink)
    monkeypatch.setattr(root, "handlers", [sink])
    access = logging.getLogger("service.access")
    assert logs.sole_handler(access) is sink
    other = logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(root, "handlers", [sink, other])  # e.g. pytest's caplog
    assert logs.sole_handler(access) is None
    monkeypatch.setattr(root, "handlers", [sink])
    access.addHandler(other)
    try:
        assert logs.sole_handler(access) is None
    finally:
        access.removeHandler(other)
    sink.close()
