"""Waiting for ``vllm serve`` to open its port, and failing at once when it dies instead.

Modal waits for a web server's port for the whole ``startup_timeout`` (20 minutes here, to cover
the first weights download). If vLLM exits during startup (out of GPU memory, a bad flag, a
gated model without a token) nothing would listen and the GPU would be billed for those 20
minutes before Modal gives up. Polling the process while waiting for the port turns that into an
error with vLLM's exit code within a second or two. Pure Python: tests run it against real
processes and sockets on 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from typing import Protocol


class Process(Protocol):
    """What is needed of a ``subprocess.Popen``."""

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""


class VllmExitedError(RuntimeError):
    """``vllm serve`` exited before it opened its port."""

    def __init__(self, returncode: int) -> None:
        super().__init__(
            f"vllm serve exited with code {returncode} during startup (its log is above: out of GPU "
            "memory, a bad flag, or a gated model without MODAL_HF_TOKEN_SECRET are the usual causes); "
            "stopping the container now instead of billing the rest of the startup timeout"
        )
        self.returncode = returncode


def wait_until_listening(
    process: Process,
    port: int,
    *,
    timeout_s: float,
    host: str = "127.0.0.1",
    poll_interval_s: float = 1.0,
) -> float:
    """Blocks until something accepts connections on ``host:port``, while ``process`` runs.

    Args:
        process: The started server.
        port: The port it will listen on.
        timeout_s: Give up after this many seconds.
        host: Where to connect.
        poll_interval_s: Pause between attempts.

    Returns:
        Seconds it took.

    Raises:
        VllmExitedError: The process exited first.
        TimeoutError: The port did not open in time.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        returncode = process.poll()
        if returncode is not None:
            raise VllmExitedError(returncode)
        try:
            with socket.create_connection((host, port), timeout=min(1.0, poll_interval_s)):
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        if time.monotonic() >= deadline:
            raise TimeoutError(f"vllm serve did not open port {port} within {timeout_s:g} s")
        time.sleep(poll_interval_s)
