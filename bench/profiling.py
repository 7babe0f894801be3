"""py-spy profiles of the gateway under the c=64 unary and c=64 stream loads (``bench.run --profile``).

Profiling runs are separate from the measured runs (sampling perturbs the process). Raw collapsed
stacks go to ``<out>/profiles/`` (git-ignored); the own-time / total-time tables go to
``<out>/profile.md`` and into ``results.json``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

from bench.loadgen import run_load
from bench.profile import markdown, record, summarise_collapsed
from bench.scenarios import FULL, QUICK

PROFILED = ("c64_unary", "c64_stream", "c16_unary", "c16_stream")
RECORD_S = 5.0


def profile_gateway(bench: Any, target: str, pid: int, native: bool = False) -> dict[str, Any]:
    """Records py-spy while each profiled scenario runs; returns summaries keyed by scenario."""
    scenarios = {s.key: s for s in (QUICK if bench.quick else FULL) if s.key in PROFILED}
    prof_dir = bench.out / "profiles"
    prof_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    sections = ["# Gateway profiles (py-spy)", ""]
    for key, sc in scenarios.items():
        for mode in ("python", "native") if native else ("python",):
            sc_long = replace(sc, warmup_s=1.0, duration_s=RECORD_S + 2.0)
            load: dict[str, Any] = {}

            def drive(sc_long: Any = sc_long, load: dict[str, Any] = load) -> None:
                load.update(run_load(bench.spec(sc_long, "grpc", target)))

            thread = threading.Thread(target=drive, name=f"load-{key}")
            thread.start()
            time.sleep(sc_long.warmup_s + 1.5)  # worker start-up plus warm-up
            raw = prof_dir / f"{key}_{mode}.txt"
            err = record(pid, raw, RECORD_S, native=mode == "native")
            thread.join()
            name = f"{key}_{mode}"
            if err is not None:
                results[name] = {"error": err}
                sections += [f"### {name}", "", f"failed: {err}", ""]
                continue
            summary = summarise_collapsed(raw.read_text(), top=25)
            results[name] = {
                "raw": str(raw),
                "load_rps": load.get("throughput_rps"),
                "load_chunks_per_s": load.get("chunks_per_s"),
                "summary": summary,
            }
            title = f"{sc.title} ({mode} frames; {load.get('throughput_rps', 0):.0f} req/s while sampled)"
            sections.append(markdown(title, summary, top=20))
    (bench.out / "profile.md").write_text("\n".join(sections) + "\n")
    return results
