"""Processes the benchmark starts (upstream, gateway, LiteLLM) and what it reads about them.

Every process is started in its own session (so a terminal Ctrl-C reaches only the orchestrator,
which then stops them in order) with ``PR_SET_PDEATHSIG`` (so they die with the orchestrator even
when it is killed outright), pinned to a core with ``taskset``, and stopped by its own pid:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not glibc: children then outlive a killed orchestrator, nothing worse
    _LIBC = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: no imports or library loads here."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pin_prefix(cpu: int | None) -> list[str]:
    """``taskset -c N`` when pinning is possible, else nothing."""
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


@dataclass
class Managed:
    """One started process."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        """The end of its log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Starts processes and guarantees they are all stopped (``with ProcessGroup(...) as g``)."""

    log_dir: Path
    procs: list[Managed] = field(default_factory=list)

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, cpu: int | None = None
    ) -> Managed:
        """Starts ``cmd`` pinned to ``cpu``, output to ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("wb")
        try:
            popen = subprocess.Popen(
                [*pin_prefix(cpu), *cmd],
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        managed = Managed(name, popen, log_path)
        self.procs.append(managed)
        return managed

    def stop(self, managed: Managed, grace_s: float = 8.0) -> None:
        """SIGTERM to the process's own group (its pid), then SIGKILL after ``grace_s``."""
        if managed not in self.procs:
            return
        self.procs.remove(managed)
        if managed.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(managed.pid, signal.SIGTERM)
        try:
            managed.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(managed.pid, signal.SIGKILL)
            managed.popen.wait(timeout=5)

    def stop_all(self) -> None:
        """Stops every process still running, newest first."""
        for managed in reversed(list(self.procs)):
            self.stop(managed)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until(check: Callable[[], bool], timeout_s: float, managed: Managed | None = None, what: str = "") -> None:
    """Polls ``check`` until it is true; raises with the process log when it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if managed is not None and not managed.alive():
            raise RuntimeError(f"{managed.name} exited ({managed.popen.returncode}):\n{managed.log_tail()}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = managed.log_tail() if managed is not None else ""
    raise TimeoutError(f"{what or 'process'} not ready after {timeout_s:.0f} s\n{tail}")


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """Whether GET ``url`` answers 2xx."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return 200 <= int(resp.status) < 300


def grpc_serving(target: str) -> bool:
    """Whether grpc.health.v1 at ``target`` reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


# ---- /proc readings --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (LiteLLM may fork workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants, bytes (0 when gone)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants, seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


class RSSSampler:
    """Samples the RSS of a process tree every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[RSSSampler]:
        """Samples while the block runs."""
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=2)
            self.peak = max(self.peak, rss_bytes(self.pid))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (``/proc/stat``).

    The difference of two readings shows how busy the machine was over a window, every process
    counted (this benchmark's and other engineers').
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return (total - idle) / CLK_TCK, total / CLK_TCK
