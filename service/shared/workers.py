"""``WORKERS=N``: N gateway processes on one port, under a supervisor.

One gateway process uses one core, so more cores need more processes. Each worker is a whole
gateway (``python -m service``) binding the same address with ``SO_REUSEPORT``; the kernel spreads
new connections across them (the pattern of grpc's own multiprocessing example). Workers are
started as fresh interpreters, never forked: gRPC core and the event loop must not be inherited.

The supervisor owns no gRPC state. It

* starts the embedded llama.cpp server once, when the chain uses it, and hands its URL to the
  workers (:data:`service.providers.local.SHARED_SERVER_ENV`): one model in memory, not N;
* gives each worker its own Prometheus port (``METRICS_ADDRESS`` port + index) and its own
  ``service.instance.id`` (``<host>-w<index>``) so OTLP metrics from all workers stay apart;
* restarts a worker that dies, after a short backoff; more than :data:`MAX_DEATHS` deaths within
  :data:`DEATH_WINDOW_S` means they keep dying: everything stops and the supervisor exits 1
  (a worker exiting 2, a configuration error, stops everything at once: it would fail again);
* forwards SIGTERM/SIGINT (graceful drain of every worker, SHUTDOWN_GRACE_S each) and SIGHUP
  (reload) to all workers; a worker still running after the grace period plus
  :data:`KILL_AFTER_S` is killed;
* holds the write end of a pipe (the lifeline) whose read end every worker watches
  (:func:`watch_supervisor`): when the supervisor dies, however it dies (SIGKILL, the OOM killer),
  the kernel closes its end, every worker reads EOF and drains and exits as on SIGTERM, killing
  itself if the drain outlasts the same deadline. No orphan keeps the port with a dead supervisor's
  configuration, and nothing restarts behind the supervisor's back. A pipe rather than Linux's
  ``PR_SET_PDEATHSIG``: that fires when the *thread* that started the child exits, leaves a window
  before the child can set it (closed only by a ``getppid`` check), and is Linux-only; EOF on a pipe
  has no window (a worker whose supervisor died before it looked reads EOF at once).

The embedded llama.cpp server (xllamacpp) runs as threads inside the supervisor, not as a process of
its own, so it ends with the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from service.config import Settings

log = logging.getLogger(__name__)

WORKER_ENV = "GATEWAY_WORKER_INDEX"  # set in each worker's environment: its index, 0..N-1
LIFELINE_ENV = "GATEWAY_LIFELINE_FD"  # the read end of the supervisor's lifeline pipe, in each worker
MAX_DEATHS = 5
DEATH_WINDOW_S = 60.0
KILL_AFTER_S = 5.0
POLL_S = 0.1


def is_worker(env: Mapping[str, str] = os.environ) -> bool:
    """This process was started by the supervisor (it serves; it does not supervise)."""
    return WORKER_ENV in env


def watch_supervisor(grace_s: float, env: Mapping[str, str] = os.environ) -> None:
    """In a worker: drain and exit when the supervisor is gone (EOF on the lifeline).

    A daemon thread blocks on the lifeline; it returns at once when the supervisor died before the
    worker got here. The worker then gets SIGTERM, its own graceful stop (or the default action,
    before the server installed its handler), and exits hard if still running ``grace_s`` +
    :data:`KILL_AFTER_S` later, the deadline the supervisor would have given it. A no-op outside
    a worker.
    """
    raw = env.get(LIFELINE_ENV, "")
    if not raw:
        return
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError):
        log.error("worker: %s=%r is not an open file: this worker will outlive its supervisor", LIFELINE_ENV, raw)
        return

    def watch() -> None:
        try:
            while os.read(fd, 1):  # the supervisor never writes: only EOF (or an error) returns
                pass
        except OSError:
            pass
        log.error("worker: the supervisor is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s + KILL_AFTER_S)
        log.error("worker: still running %.1f s after the supervisor died; exiting", grace_s + KILL_AFTER_S)
        os._exit(1)

    threading.Thread(target=watch, name="supervisor-lifeline", daemon=True).start()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Supervisor:
    """Runs ``settings.workers`` workers until a signal, or until they keep dying."""

    def __init__(self, settings: Settings, command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.command = list(command or [sys.executable, "-m", "service"])
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * settings.workers
        self.deaths: deque[float] = deque()
        self.restart_at: dict[int, float] = {}
        self._stopping = False
        self._hup = False
        self._local: Any = None  # the shared llama.cpp provider and server, kept alive while workers run
        self._local_server: Any = None
        self._env: dict[str, str] = dict(os.environ)
        self._lifeline: tuple[int, int] | None = None

    def _prepare(self) -> None:
        # Never written: its write end closing (this process ending) is the workers' signal to stop.
        # os.pipe's ends are not inherited, so the write end stays in this process alone.
        self._lifeline = os.pipe()
        self._env[LIFELINE_ENV] = str(self._lifeline[0])
        host, port = _split(self.settings.grpc_listen_address)
        if port == 0:  # every worker must bind the same port: choose it here
            port = _free_port(host.strip("[]"))
            self._env["GRPC_LISTEN_ADDRESS"] = f"{host}:{port}"
        log.info("supervisor: %d workers on %s:%d (SO_REUSEPORT)", len(self.workers), host, port)
        self._start_local()

    def _start_local(self) -> None:
        from service.providers.local import SHARED_SERVER_ENV
        from service.providers.registry import build_chain, plan_chain

        if "local" not in [name for name, _ in plan_chain(self.settings)] or SHARED_SERVER_ENV in self._env:
            return
        local: Any = next(p for p in build_chain(self.settings) if p.name == "local")
        self._local = local
        self._local_server = local._start_server()  # blocks until the model is loaded
        self._env[SHARED_SERVER_ENV] = local.endpoint
        log.info("supervisor: embedded llama.cpp at %s, shared by the workers", local.endpoint)

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self._env)
        env[WORKER_ENV] = str(index)
        from service.observe.otel_setup import metrics_address

        exporters = ["prometheus"] if "prometheus" in env.get("OTEL_METRICS_EXPORTER", "") else []
        scrape = metrics_address(self.settings, exporters)
        if scrape:
            host, port = _split(scrape)
            if port:
                env["METRICS_ADDRESS"] = f"{host}:{port + index}"
        attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        instance = f"service.instance.id={socket.gethostname()}-w{index}"
        env["OTEL_RESOURCE_ATTRIBUTES"] = f"{attrs},{instance}" if attrs else instance
        return env

    def _spawn(self, index: int) -> None:
        lifeline = self._lifeline[:1] if self._lifeline else ()
        proc = subprocess.Popen(self.command, env=self._worker_env(index), pass_fds=lifeline)
        self.workers[index] = proc
        log.info("supervisor: worker %d started (pid %d)", index, proc.pid)

    def _signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self._stopping = True

    def _broadcast(self, signum: int) -> None:
        for proc in self.workers:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signum)

    def _reap(self) -> int | None:
        """Restarts dead workers; returns an exit code when the supervisor must stop."""
        now = time.monotonic()
        for index, proc in enumerate(self.workers):
            if proc is None:
                if now >= self.restart_at.get(index, 0.0):
                    self._spawn(index)
                continue
            code = proc.poll()
            if code is None:
                continue
            self.workers[index] = None
            log.error("supervisor: worker %d (pid %d) exited with %d", index, proc.pid, code)
            if code == 2:
                log.error("supervisor: a configuration error; stopping (a restart would fail the same way)")
                return 2
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > DEATH_WINDOW_S:
                self.deaths.popleft()
            if len(self.deaths) > MAX_DEATHS:
                log.error("supervisor: %d worker deaths within %.0f s; stopping", len(self.deaths), DEATH_WINDOW_S)
                return 1
            self.restart_at[index] = now + min(2.0, 0.25 * 2 ** (len(self.deaths) - 1))
        return None

    def _drain(self) -> None:
        self._broadcast(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + KILL_AFTER_S
        for proc in self.workers:
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor: worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def run(self) -> int:
        """Supervises until SIGTERM/SIGINT (exit 0) or until workers keep dying (exit 1 or 2)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        self._prepare()
        code = 0
        try:
            while not self._stopping:
                if self._hup:
                    self._hup = False
                    self._broadcast(signal.SIGHUP)
                failed = self._reap()
                if failed is not None:
                    code = failed
                    break
                time.sleep(POLL_S)
            log.info("supervisor: stopping %d workers", sum(p is not None for p in self.workers))
        finally:
            self._drain()
            self._local = self._local_server = None
            for fd in self._lifeline or ():
                os.close(fd)
        log.info("supervisor: stopped")
        return code
