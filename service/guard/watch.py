"""Watches configuration files and calls back when one changes (polling ``os.stat``).

Polling is deliberate: it needs no inotify, works on every file system (network mounts, the
symlink swaps Kubernetes uses for Secrets and ConfigMaps, since ``stat`` follows the link), and a
check every couple of seconds costs a few system calls. A file is "changed" when its inode, size
or modification time differs from the version last reported, or it appeared or vanished. A change
is reported once the file has looked the same on two polls in a row, so a file caught half-written
(truncated, then filled) is not reported as its empty intermediate.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None


def stamp(path: str) -> Stamp:
    """What identifies one version of ``path`` (None when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatcher:
    """Calls ``on_change(paths)`` from a background task when some of ``paths`` changed."""

    def __init__(self, paths: Sequence[str], interval_s: float, on_change: Callable[[list[str]], None]) -> None:
        self.interval_s = interval_s
        self._on_change = on_change
        self._reported = {path: stamp(path) for path in dict.fromkeys(paths)}
        self._seen = dict(self._reported)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts polling (nothing to do without files or with a zero interval)."""
        if self._reported and self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="config-watch")

    async def stop(self) -> None:
        """Stops polling."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def poll(self) -> list[str]:
        """Looks once; returns the paths whose new version has now been seen twice in a row."""
        changed = []
        for path, reported in self._reported.items():
            now = stamp(path)
            if now != reported and now == self._seen[path]:
                self._reported[path] = now
                changed.append(path)
            self._seen[path] = now
        return changed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            changed = self.poll()
            if changed:
                try:
                    self._on_change(changed)
                except Exception:  # a reload bug must not end the watching
                    log.exception("reloading after a change of %s failed", changed)
