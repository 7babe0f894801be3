"""The batching log handler: INFO lines within the flush interval, WARNING at once, all on close."""

from __future__ import annotations

import io
import logging
import time

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
