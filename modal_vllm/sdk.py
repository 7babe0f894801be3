"""What the gateway asks Modal's own API (never the GPU container): the web URL and live stats.

Both questions go to Modal's control plane with an API token (``MODAL_TOKEN_ID`` /
``MODAL_TOKEN_SECRET``), so neither starts a container or resets its idle timer. That is what
makes :func:`read_stats` the safe way to ask "is it warm?": any HTTP request to the endpoint,
``/health`` included, boots a scaled-to-zero GPU and bills it for the whole scale-down window.

The SDK calls block, and without network the SDK retries for about a minute, so they run in a
daemon thread under a timeout (a daemon thread, not an executor: executors join their threads at
exit, and a call stuck retrying would hold the process). Both calls are injectable: tests pass
fakes and never reach the network.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from modal_vllm.settings import APP_NAME, FUNCTION_NAME

T = TypeVar("T")

DEFAULT_API_TIMEOUT_S = 20.0
"""Bound on one call to Modal's API, which otherwise retries for about a minute without network."""

DEPLOY_HINT = "deploy with `modal deploy modal_vllm/deployment.py` (see docs/modal.md)"


@dataclass(frozen=True, slots=True)
class FunctionStats:
    """A snapshot of the deployed function, as Modal's API reports it.

    Attributes:
        running_containers: Containers up or booting (the SDK's ``num_total_runners``); 0 means
            scaled to zero: nothing is billed, and the next request pays a cold start.
        backlog: Requests queued at Modal waiting for a container.
    """

    running_containers: int
    backlog: int


WebUrlLookup = Callable[[str, str, Mapping[str, str]], str | None]
"""(app name, function name, env) -> the deployed function's web URL, or None if it has none."""

StatsSource = Callable[[str, str, Mapping[str, str]], FunctionStats]
"""(app name, function name, env) -> the function's current stats; raises when Modal cannot tell."""


class ModalApiError(RuntimeError):
    """Modal's API could not answer (missing or refused token, app not deployed, no network)."""


class EndpointLookupError(ModalApiError):
    """The Modal endpoint is configured through tokens, but its URL could not be looked up."""


def tokens_configured(env: Mapping[str, str]) -> bool:
    """Whether a Modal API token is set; half a token is an error, not silence.

    Args:
        env: The environment (``MODAL_TOKEN_ID``, ``MODAL_TOKEN_SECRET``).

    Returns:
        True when both are set, False when neither is.

    Raises:
        EndpointLookupError: Only one of the two is set; the message names the missing one.
    """
    has_id = bool(env.get("MODAL_TOKEN_ID", "").strip())
    has_secret = bool(env.get("MODAL_TOKEN_SECRET", "").strip())
    if has_id != has_secret:
        missing = "MODAL_TOKEN_SECRET" if has_id else "MODAL_TOKEN_ID"
        raise EndpointLookupError(
            f"{missing} is not set: MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are needed together to "
            f"ask Modal about app {APP_NAME!r}; or set MODAL_WEB_URL instead"
        )
    return has_id


def read_stats(
    env: Mapping[str, str],
    *,
    source: StatsSource | None = None,
    timeout_s: float = DEFAULT_API_TIMEOUT_S,
) -> FunctionStats:
    """Reads the deployed function's container count and backlog, blocking; never wakes it.

    Args:
        env: The environment with ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` (and optionally
            ``MODAL_ENVIRONMENT``).
        source: Replaces the Modal SDK call (tests inject a fake).
        timeout_s: Give up after this many seconds.

    Returns:
        The stats.

    Raises:
        ModalApiError: No token, or Modal did not answer; the message says what to check and
            never contains the token secret.
    """
    call = _stats_call(env, source)
    try:
        return run_in_daemon_thread(call, timeout_s)
    except Exception as exc:
        raise _stats_error(exc, env) from None


async def read_stats_async(
    env: Mapping[str, str],
    *,
    source: StatsSource | None = None,
    timeout_s: float = DEFAULT_API_TIMEOUT_S,
) -> FunctionStats:
    """Like :func:`read_stats` (same arguments, result and errors), without blocking the loop."""
    call = _stats_call(env, source)
    try:
        return await run_in_daemon_thread_async(call, timeout_s)
    except Exception as exc:
        raise _stats_error(exc, env) from None


def _stats_call(env: Mapping[str, str], source: StatsSource | None) -> Callable[[], FunctionStats]:
    if not tokens_configured(env):
        raise ModalApiError(
            "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set: Modal's container count cannot be "
            "read without an API token (`modal token new`, or a token from the dashboard)"
        )
    chosen, frozen_env = source or modal_sdk_stats, dict(env)
    return lambda: chosen(APP_NAME, FUNCTION_NAME, frozen_env)


def _stats_error(exc: Exception, env: Mapping[str, str]) -> ModalApiError:
    if isinstance(exc, ModalApiError):
        return exc
    detail = scrub(f"{type(exc).__name__}: {exc}", [env.get("MODAL_TOKEN_SECRET", ""), env.get("MODAL_TOKEN_ID", "")])
    return ModalApiError(
        f"could not read the container count of Modal app {APP_NAME!r} function {FUNCTION_NAME!r} "
        f"({detail}); check MODAL_TOKEN_ID/MODAL_TOKEN_SECRET and that the app is deployed ({DEPLOY_HINT})"
    )


def modal_sdk_stats(app_name: str, function_name: str, env: Mapping[str, str]) -> FunctionStats:
    """The real :data:`StatsSource`: ``modal.Function.from_name(...).get_current_stats()``."""
    # Imported here: modal costs ~0.3 s to import and most callers never need it.
    import modal

    # An explicit client uses the tokens in `env`, which need not be os.environ.
    with modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"]) as client:
        function = modal.Function.from_name(
            app_name, function_name, environment_name=env.get("MODAL_ENVIRONMENT") or None, client=client
        )
        stats = function.get_current_stats()
        return FunctionStats(running_containers=int(stats.num_total_runners), backlog=int(stats.backlog))


def modal_sdk_web_url(app_name: str, function_name: str, env: Mapping[str, str]) -> str | None:
    """The real :data:`WebUrlLookup`: ``modal.Function.from_name(...).get_web_url()``."""
    import modal

    with modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"]) as client:
        function = modal.Function.from_name(
            app_name, function_name, environment_name=env.get("MODAL_ENVIRONMENT") or None, client=client
        )
        url: str | None = function.get_web_url()
        return url


def scrub(text: str, secrets: list[str]) -> str:
    """Replaces every non-empty secret in ``text`` with ``***``.

    Belt and braces: no message built here includes a secret, but exception texts are not ours.
    Values shorter than 4 characters are left alone: replacing "" or "a" would mangle every word,
    and so short a value protects nothing.
    """
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def run_in_daemon_thread(call: Callable[[], T], timeout_s: float) -> T:
    """Runs a blocking call in a daemon thread and waits at most ``timeout_s`` for it.

    Raises:
        TimeoutError: No answer in time (the thread is left to finish or die with the process).
    """
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name="modal-api", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer from Modal within {timeout_s:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


async def run_in_daemon_thread_async(call: Callable[[], T], timeout_s: float) -> T:
    """Like :func:`run_in_daemon_thread`, awaiting the answer instead of blocking the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # the waiter timed out or was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        value: Any
        try:
            ok, value = True, call()
        except BaseException as exc:
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the loop closed while we waited: nobody wants the answer

    threading.Thread(target=target, name="modal-api", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no answer from Modal within {timeout_s:g} s") from None
