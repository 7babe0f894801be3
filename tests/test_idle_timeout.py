"""IdleTimeout: the mid-answer idle timeout that counts only the router's waits on the upstream."""

from __future__ import annotations

import asyncio

import pytest

from service.routing.idle import IdleTimeout


async def _wait_upstream(idle: IdleTimeout, seconds: float) -> None:
    idle.waiting()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError as exc:
        idle.expired(exc)
        raise
    idle.idle()


async def test_silence_while_waiting_raises_timeout_error() -> None:
    with IdleTimeout(0.05) as idle, pytest.raises(TimeoutError):
        await _wait_upstream(idle, 5)


async def test_answers_within_the_idle_time_never_time_out_however_long_the_stream() -> None:
    with IdleTimeout(0.05) as idle:
        for _ in range(20):  # 0.4 s in all, each wait well inside 0.05 s
            await _wait_upstream(idle, 0.02)


async def test_time_the_caller_spends_reading_does_not_count() -> None:
    with IdleTimeout(0.05) as idle:
        await _wait_upstream(idle, 0.01)
        await asyncio.sleep(0.2)  # the caller reads slowly: not the upstream's silence
        await _wait_upstream(idle, 0.01)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def call() -> None:
        with IdleTimeout(5) as idle:
            await _wait_upstream(idle, 5)

    task = asyncio.create_task(call())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_it_nests_inside_an_outer_timeout_that_keeps_its_own_meaning() -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the outer one expires first: its TimeoutError, ours stays quiet
            with IdleTimeout(5) as idle:
                await _wait_upstream(idle, 5)
    with IdleTimeout(0.05) as idle:  # and the other way round
        async with asyncio.timeout(5):
            with pytest.raises(TimeoutError):
                await _wait_upstream(idle, 5)


async def test_no_timer_is_left_behind() -> None:
    loop = asyncio.get_running_loop()
    with IdleTimeout(30) as idle:
        await _wait_upstream(idle, 0.001)
    await asyncio.sleep(0)
    assert idle._handle is None
    assert all(h.cancelled() for h in getattr(loop, "_scheduled", []) if getattr(h, "_callback", None) == idle._fire)
