"""Summaries of py-spy profiles (``py-spy record --format raw``: collapsed stacks).

``python -m bench.profile FILE [--top 25]`` prints the functions with the most *own* time (the
leaf frame of each sample) and the most *total* time (anywhere on the stack), in percent of all
samples. ``bench.run --profile`` records the gateway under load with py-spy and writes these
summaries next to the results.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE_NO = re.compile(r":\d+\)$")


def _frame_key(frame: str) -> str:
    """``func (file.py:123)`` -> ``func (file.py)``: aggregate a function over its lines."""
    return _LINE_NO.sub(")", frame.strip())


IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (", "select (", "__select", "nanosleep", "pthread_cond_wait")


def _is_idle(leaf: str) -> bool:
    return leaf.startswith(IDLE_LEAVES)


def summarise_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Own-time and total-time tables from collapsed stacks (``a;b;c count`` per line).

    Samples are split three ways: the main thread doing work (the event loop: the figures that
    matter), the main thread idle in epoll (native profiles only; py-spy's Python-only mode skips
    idle threads), and other threads (gRPC's completion-queue poller thread, the SQLite ledger's
    writer). The ``own``, ``total`` and ``own_by_package`` tables cover the busy main thread only,
    in percent of it; ``own_all`` covers every sample; ``threads`` counts samples per thread name.

    Profiles recorded with ``--threads`` start each stack with ``thread (id): name``, which says for
    sure which thread a sample is from (py-spy's non-blocking mode often cuts a stack short, so
    without it such samples of the main thread look like another thread's).
    """
    own: Counter[str] = Counter()
    own_all: Counter[str] = Counter()
    total: Counter[str] = Counter()
    own_by_file: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = busy = idle = other = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [_frame_key(f) for f in stack.split(";") if f.strip()]
        thread = None
        if frames and frames[0].startswith("thread ("):
            thread = frames.pop(0).partition(": ")[2] or "?"
        if not frames:
            continue
        samples += count
        leaf = frames[-1]
        own_all[leaf] += count
        if thread is not None:
            threads[thread] += count
        is_main = thread == "MainThread" if thread is not None else _looks_main(frames)
        if not is_main:
            other += count
            continue
        if _is_idle(leaf):
            idle += count
            continue
        busy += count
        own[leaf] += count
        m = re.search(r"\(([^)]*)\)$", leaf)
        own_by_file[_package(m.group(1) if m else "?")] += count
        for f in set(frames):
            total[f] += count

    def table(c: Counter[str], denominator: int) -> list[dict[str, Any]]:
        d = max(1, denominator)
        return [{"function": f, "samples": n, "pct": 100.0 * n / d} for f, n in c.most_common(top)]

    return {
        "samples": samples,
        "main_busy": busy,
        "main_idle": idle,
        "other_threads": other,
        "own": table(own, busy),
        "total": table(total, busy),
        "own_by_package": table(own_by_file, busy),
        "own_all": table(own_all, samples),
        "threads": [{"thread": t, "samples": n, "pct": 100.0 * n / max(1, samples)} for t, n in threads.most_common()],
    }


def _looks_main(frames: list[str]) -> bool:
    """Without thread names: a stack through the entry point or the loop is the main thread's."""
    return any(f.startswith(("_run_module_as_main", "Runner.run", "<module>")) for f in frames)


def _package(path: str) -> str:
    """Groups a file path into a package-ish bucket (httpx, grpc, service/routing/router.py, ...)."""
    path = path.split(":", 1)[0]
    if path.startswith("service/") or path.startswith("bench/"):
        return path
    parts = path.split("/")
    return parts[0] if parts else path


def _py_spy_candidates() -> list[str | None]:
    # py-spy is a tool, not a dependency of the service: bench/setup_pyspy.sh puts it in its own venv.
    return [
        shutil.which("py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
        str(Path(__file__).resolve().parent / ".venv-pyspy" / "bin" / "py-spy"),
    ]


def record(pid: int, out_raw: Path, duration_s: float, rate_hz: int = 250, native: bool = False) -> str | None:
    """Runs ``py-spy record`` on ``pid``; returns an error string, or None when it worked."""
    py_spy = next((c for c in _py_spy_candidates() if c and Path(c).exists()), None)
    if py_spy is None:
        return "py-spy is not installed (bash bench/setup_pyspy.sh)"
    cmd = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--threads",  # each stack names its thread: main-thread samples are told apart for sure
        "-o",
        str(out_raw),
    ]
    # Non-blocking sampling does not pause the process, but py-spy cannot unwind native stacks so.
    cmd.append("--native" if native else "--nonblocking")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if proc.returncode != 0 or not out_raw.exists():
        return f"py-spy failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None


def markdown(title: str, summary: dict[str, Any], top: int = 15) -> str:
    """A Markdown section with the own-time and total-time tables."""
    lines = [
        f"### {title}",
        "",
        f"{summary['samples']} samples: main thread busy {summary.get('main_busy', '?')}, main thread idle in "
        f"epoll {summary.get('main_idle', '?')}, other threads {summary.get('other_threads', '?')}"
        + (
            " (" + ", ".join(f"{t['thread']} {t['samples']}" for t in summary["threads"]) + ")"
            if summary.get("threads")
            else ""
        )
        + ". "
        "Percentages below are of the busy main-thread samples. `Runner.run` own time is C code run by the "
        "event loop that Python-only sampling cannot see into (uvloop, gRPC's Cython layer, syscalls); the "
        "native profile breaks it down.",
        "",
    ]
    for key, heading in (
        ("own", "Own time (leaf frame)"),
        ("total", "Total time (anywhere on the stack)"),
        ("own_by_package", "Own time by package"),
    ):
        lines += [f"**{heading}**", "", "| % | samples | function |", "|---:|---:|---|"]
        for row in summary[key][:top]:
            lines.append(f"| {row['pct']:.1f} | {row['samples']} | `{row['function']}` |")
        lines.append("")
    return "\n".join(lines)


def rebuild(out: Path, top: int = 20) -> Path:
    """Re-summarises ``<out>/profiles/*.txt`` into ``<out>/profile.md`` (and results.json's profiles)."""
    import json

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    profiles = results.get("profiles", {})
    sections = ["# Gateway profiles (py-spy)", ""]
    for raw in sorted((out / "profiles").glob("*.txt")):
        summary = summarise_collapsed(raw.read_text(), top=25)
        entry = profiles.setdefault(raw.stem, {"raw": str(raw)})
        entry["summary"] = summary
        load = entry.get("load_rps")
        chunks = entry.get("load_chunks_per_s")
        rate = f"; {load:.0f} req/s, {chunks:.0f} chunks/s while sampled" if load is not None else ""
        sections.append(markdown(f"{raw.stem}{rate}", summary, top))
    if results:
        results["profiles"] = profiles
        results_path.write_text(json.dumps(results, indent=2, default=str))
    path = out / "profile.md"
    path.write_text("\n".join(sections) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.profile FILE`` or ``python -m bench.profile --rebuild OUT``."""
    p = argparse.ArgumentParser(description="summarise a py-spy raw (collapsed) profile")
    p.add_argument("file", type=Path, nargs="?")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rebuild", type=Path, help="results folder: re-summarise profiles/*.txt into profile.md")
    a = p.parse_args(argv)
    if a.rebuild is not None:
        print(rebuild(a.rebuild, a.top))
    elif a.file is not None:
        print(markdown(a.file.name, summarise_collapsed(a.file.read_text(), a.top), a.top))
    else:
        p.error("give a FILE or --rebuild OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
