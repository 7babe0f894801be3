"""Turns ``results.json`` into the Markdown table (with the targets, met or not) and a PNG plot.

``python -m bench.report bench/results/results.json`` rebuilds both from a saved run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.floor_report import evaluate_floor, markdown_floor

TARGET_NAMES = {
    "direct": "direct (baseline)",
    "floor": "floor (bare grpc.aio)",
    "relay_raw": "relay floor, raw exchange",
    "relay_provider": "relay floor, gateway's provider",
    "gateway": "gateway",
    "litellm": "LiteLLM",
}


def _get(results: dict[str, Any], target: str, scenario: str, *path: str) -> float | None:
    node: Any = results.get("targets", {}).get(target, {}).get("scenarios", {}).get(scenario)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, (int, float)) else None


def added(results: dict[str, Any], target: str, scenario: str, *path: str) -> float | None:
    """``target``'s figure minus the direct baseline's for the same scenario."""
    a = _get(results, target, scenario, *path)
    b = _get(results, "direct", scenario, *path)
    return None if a is None or b is None else a - b


def _best(results: dict[str, Any], target: str, keys: tuple[str, ...], *path: str) -> float | None:
    values = [v for k in keys if (v := _get(results, target, k, *path)) is not None]
    return max(values) if values else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and met / not met (None = not measured).

    Each row also carries ``floor``: the same figure for the floor (bare grpc.aio from memory) in
    the same run, i.e. what the target would measure if the gateway cost nothing beyond gRPC.
    """
    rows = _evaluate(results)
    targets = results.get("targets", {})
    floor_rows = []
    if "floor" in targets:
        floor_rows = _evaluate({**results, "targets": {**targets, "gateway": targets["floor"]}})
    for i, r in enumerate(rows):
        r["floor"] = floor_rows[i]["value"] if floor_rows else None
    return rows


def _evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(name: str, threshold: str, value: float | None, unit: str, ok: bool | None, note: str = "") -> None:
        if value is not None and value < 0 and unit in ("ms", "us"):
            note = (note + "; " if note else "") + "negative: the baseline was noisier than the SUT here, re-run"
        rows.append({"target": name, "threshold": threshold, "value": value, "unit": unit, "met": ok, "note": note})

    def le(v: float | None, limit: float) -> bool | None:
        return None if v is None else v <= limit

    def ge(v: float | None, limit: float) -> bool | None:
        return None if v is None else v >= limit

    v = added(results, "gateway", "c1_unary", "latency_ms", "p50")
    row("c=1 unary: added latency p50", "<= 0.5 ms", v, "ms", le(v, 0.5))
    v = added(results, "gateway", "c1_unary", "latency_ms", "p99")
    row("c=1 unary: added latency p99", "<= 1.5 ms", v, "ms", le(v, 1.5))
    v = added(results, "gateway", "c1_stream", "ttft_ms", "p50")
    row("c=1 stream: added TTFT p50", "<= 0.5 ms", v, "ms", le(v, 0.5))
    v = added(results, "gateway", "c1_stream", "ttft_ms", "p99")
    row("c=1 stream: added TTFT p99", "<= 1.5 ms", v, "ms", le(v, 1.5))
    v = added(results, "gateway", "c1_stream_paced", "gap_ms", "p50")
    row("c=1 stream: added gap between chunks p50", "<= 50 us", None if v is None else v * 1000, "us", le(v, 0.05))
    v = _best(results, "gateway", ("c64_unary", "c256_unary"), "throughput_rps")
    row("unary throughput (best of c=64, c=256), one core", ">= 2,000 req/s", v, "req/s", ge(v, 2000))
    v = _get(results, "gateway", "c64_stream", "tokens_per_s")
    msgs = _get(results, "gateway", "c64_stream", "chunks_per_s")
    if v is None:
        v = msgs
    row(
        "streamed chunks/s (c=64), one core: upstream chunks (tokens) relayed",
        ">= 50,000 chunks/s",
        v,
        "chunks/s",
        ge(v, 50_000),
        f"gRPC messages with text received: {_fmt(msgs, 0)}/s (tokens of one read share a message)",
    )
    v = _get(results, "gateway", "c256_stream_paced", "chunks_per_s")
    row(
        "streamed chunks/s, one token per message (c=256, 1 token / 2 ms)",
        ">= 50,000 chunks/s",
        v,
        "chunks/s",
        ge(v, 50_000),
        "every token arrives in its own read: the per-message relay capacity",
    )
    errs = _get(results, "gateway", "streams_2000", "errors_all")
    inflight = _get(results, "gateway", "streams_2000", "max_in_flight")
    done = _get(results, "gateway", "streams_2000", "completed_all")
    ok = None if errs is None else (errs == 0 and (inflight or 0) >= 2000)
    row(
        "2,000 concurrent streams: errors (whole run)",
        "0 errors",
        errs,
        "errors",
        ok,
        f"max open at once: {inflight}; streams completed: {done}",
    )
    v = _get(results, "gateway", "streams_2000", "sut", "rss_peak_mb")
    row("2,000 concurrent streams: peak RSS", "<= 300 MB", v, "MB", le(v, 300))
    gw = added(results, "gateway", "c1_unary", "latency_ms", "p50")
    ll = added(results, "litellm", "c1_unary", "latency_ms", "p50")
    ratio = None
    if gw is not None and ll is not None:
        ratio = float("inf") if gw <= 0 < ll else (ll / gw if gw > 0 else None)
    row(
        "added p50 latency vs LiteLLM (c=1 unary)",
        ">= 5x lower",
        ratio,
        "x",
        ge(ratio, 5.0),
        f"LiteLLM added {ll:.3f} ms" if ll is not None else "LiteLLM not measured",
    )
    gw_t = _best(results, "gateway", ("c64_unary", "c256_unary"), "throughput_rps")
    ll_t = _best(results, "litellm", ("c64_unary", "c256_unary"), "throughput_rps")
    ratio = None if gw_t is None or not ll_t else gw_t / ll_t
    row(
        "unary throughput vs LiteLLM",
        ">= 5x",
        ratio,
        "x",
        ge(ratio, 5.0),
        f"LiteLLM {ll_t:.0f} req/s" if ll_t else "LiteLLM not measured",
    )
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _met(ok: bool | None) -> str:
    return "n/a (not measured)" if ok is None else ("**met**" if ok else "**not met**")


def markdown(results: dict[str, Any]) -> str:
    """The whole Markdown report."""
    meta = results.get("meta", {})
    out = [
        "# Gateway benchmark results",
        "",
        f"- When: {meta.get('started_at', '?')}; commit {meta.get('git', '?')}; mode: {meta.get('mode', '?')}",
        f"- Machine: {meta.get('cpus', '?')} cores; {meta.get('pinning', '?')}",
        f"- Load average before / after: {meta.get('loadavg_before', '?')} / {meta.get('loadavg_after', '?')}"
        " (other engineers share this machine: figures are noisy, compare within one run)",
        f"- HTTP client for direct and LiteLLM: **{meta.get('http_client', '?')}** "
        f"({meta.get('http_client_reason', '')})",
        f"- LiteLLM: {results.get('litellm', {}).get('status', 'not run')}",
        "",
        *markdown_floor(results),
        "## Targets (issue 7, absolute)",
        "",
        "Absolute thresholds; the floor column is the same figure for the floor (bare grpc.aio answering from "
        "memory, same core, same load), i.e. what the gateway would measure if its own code cost nothing.",
        "",
        "| Target | Threshold | Measured | Floor | Verdict | Note |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in results.get("evaluation", []):
        out.append(
            f"| {r['target']} | {r['threshold']} | {_fmt(r['value'])} {r['unit']} | {_fmt(r.get('floor'))} "
            f"| {_met(r['met'])} | {r['note']} |"
        )
    out += [
        "",
        "## Added latency (target minus direct baseline, same scenario)",
        "",
        "| Scenario | Metric | gateway added | LiteLLM added |",
        "|---|---|---:|---:|",
    ]
    scen_titles = results.get("scenario_titles", {})
    for key in scen_titles:
        for label, path in (
            ("latency p50 (ms)", ("latency_ms", "p50")),
            ("latency p99 (ms)", ("latency_ms", "p99")),
            ("TTFT p50 (ms)", ("ttft_ms", "p50")),
            ("TTFT p99 (ms)", ("ttft_ms", "p99")),
            ("gap p50 (us)", ("gap_ms", "p50")),
        ):
            g = added(results, "gateway", key, *path)
            ll = added(results, "litellm", key, *path)
            if g is None and ll is None:
                continue
            scale = 1000.0 if label.startswith("gap") else 1.0
            out.append(
                f"| {scen_titles[key]} | {label} | {_fmt(None if g is None else g * scale, 3)} "
                f"| {_fmt(None if ll is None else ll * scale, 3)} |"
            )
    out += [
        "",
        "## All figures",
        "",
        "chunks/s counts messages with text as the client receives them (one per SSE event direct; the gateway may "
        "carry several tokens in one message); tokens/s counts completion tokens of streams finished in the window. "
        "Latency, TTFT in ms; gaps in us; CPU % is the system under test's CPU over the measured window "
        "(100 % = its one core); CPU/req is its CPU time per completed request.",
        "",
        "| Scenario | Target | req/s | chunks/s | tokens/s | p50 | p90 | p99 | max | TTFT p50 | TTFT p99 | gap p50 "
        "| gap p99 | errors | SUT CPU % | CPU/req (us) | RSS idle MB | RSS peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, title in scen_titles.items():
        for target, tres in results.get("targets", {}).items():
            s = tres.get("scenarios", {}).get(key)
            if not s:
                continue
            lat, ttft, gap, sut = s.get("latency_ms") or {}, s.get("ttft_ms") or {}, s.get("gap_ms") or {}, s["sut"]
            gap_p50 = gap.get("p50")
            gap_p99 = gap.get("p99")
            out.append(
                f"| {title} | {TARGET_NAMES.get(target, target)} | {_fmt(s['throughput_rps'], 0)} "
                f"| {_fmt(s['chunks_per_s'], 0) if ttft else '-'} "
                f"| {_fmt(s.get('tokens_per_s'), 0) if ttft else '-'} "
                f"| {_fmt(lat.get('p50'), 3)} | {_fmt(lat.get('p90'), 3)} | {_fmt(lat.get('p99'), 3)} "
                f"| {_fmt(lat.get('max'), 3)} | {_fmt(ttft.get('p50'), 3)} | {_fmt(ttft.get('p99'), 3)} "
                f"| {_fmt(None if gap_p50 is None else gap_p50 * 1000, 1)} "
                f"| {_fmt(None if gap_p99 is None else gap_p99 * 1000, 1)} "
                f"| {s['errors']}{' ' + str(s['error_kinds']) if s['errors'] else ''}"
                f"{' (whole run: ' + str(s.get('errors_all')) + ')' if s.get('errors_all') != s['errors'] else ''} "
                f"| {_fmt(sut.get('cpu_util_pct'), 0)} | {_fmt(sut.get('cpu_us_per_request'), 0)} "
                f"| {_fmt(sut.get('rss_idle_mb'), 1)} | {_fmt(sut.get('rss_peak_mb'), 1)} |"
            )
    fb = results.get("fallback", {})
    if fb:
        out += [
            "",
            "## Fallback (first provider refuses connections)",
            "",
            "c=1 unary, 16 tokens, each configuration a fresh gateway measured back to back with the reference. "
            "'Added vs reference' is the cost of the fallback itself; the probe column shows the `attempts` of "
            "one call, i.e. whether the dead provider was skipped or really tried.",
            "",
            "| Configuration | p50 ms | p99 ms | added p50 vs reference | added p99 vs reference "
            "| added p50 vs direct | errors | attempts seen on a probe call |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        ref = (fb.get("fallback_reference", {}).get("summary") or {}).get("latency_ms") or {}
        plain, plain99 = ref.get("p50"), ref.get("p99")
        direct = _get(results, "direct", "c1_unary", "latency_ms", "p50")
        for key, r in fb.items():
            if "error" in r:
                out.append(f"| {r.get('title', key)} | - | - | - | - | - | - | failed: {r['error'][:200]} |")
                continue
            if "summary" not in r:
                out.append(f"| {r['title']} | - | - | - | - | - | - | {r.get('probe', '')} |")
                continue
            lat = r["summary"].get("latency_ms") or {}
            p50 = lat.get("p50")
            out.append(
                f"| {r['title']} | {_fmt(p50, 3)} | {_fmt(lat.get('p99'), 3)} "
                f"| {_fmt(None if p50 is None or plain is None else p50 - plain, 3)} "
                f"| {_fmt(None if lat.get('p99') is None or plain99 is None else lat['p99'] - plain99, 3)} "
                f"| {_fmt(None if p50 is None or direct is None else p50 - direct, 3)} "
                f"| {r['summary']['errors']} | {r.get('probe', '')} |"
            )
    cal = meta.get("http_client_calibration")
    if cal:
        out += [
            "",
            "## HTTP client calibration (direct baseline)",
            "",
            "| Client | c=1 p50 ms | c=1 p99 ms | c=64 req/s |",
            "|---|---:|---:|---:|",
        ]
        for name, c in cal.items():
            out.append(
                f"| {name} | {_fmt(c.get('c1_p50_ms'), 3)} | {_fmt(c.get('c1_p99_ms'), 3)} "
                f"| {_fmt(c.get('c64_rps'), 0)} |"
            )
    if results.get("profiles"):
        out += ["", "## Profiles", "", "See `profile.md` (py-spy, gateway under load)."]
    if results.get("interrupted"):
        out += ["", "**The run was interrupted: the figures above are partial.**"]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Writes the PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    targets = [t for t in ("direct", "floor", "gateway", "litellm") if t in results.get("targets", {})]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    labels, gw_vals, ll_vals = [], [], []
    for key, path_, label in (
        ("c1_unary", ("latency_ms", "p50"), "unary p50"),
        ("c1_unary", ("latency_ms", "p99"), "unary p99"),
        ("c1_stream", ("ttft_ms", "p50"), "TTFT p50"),
        ("c1_stream", ("ttft_ms", "p99"), "TTFT p99"),
    ):
        labels.append(label)
        gw_vals.append(added(results, "gateway", key, *path_) or 0.0)
        ll_vals.append(added(results, "litellm", key, *path_) or 0.0)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], gw_vals, 0.4, label="gateway")
    ax.bar([x + 0.2 for x in xs], ll_vals, 0.4, label="LiteLLM")
    ax.axhline(0.5, color="green", linestyle="--", linewidth=1, label="p50 target 0.5 ms")
    ax.axhline(1.5, color="orange", linestyle="--", linewidth=1, label="p99 target 1.5 ms")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("added ms (vs direct)")
    ax.set_title("c=1 added latency")
    ax.legend(fontsize=8)

    def bars(ax: Any, keys: list[str], metric: str, title: str, ylabel: str, target: float | None) -> None:
        keys = [k for k in keys if any(_get(results, t, k, metric) is not None for t in targets)] or keys
        width = 0.8 / max(1, len(targets))
        for i, t in enumerate(targets):
            vals = [_get(results, t, k, metric) or 0.0 for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=TARGET_NAMES[t])
        if target:
            ax.axhline(target, color="green", linestyle="--", linewidth=1, label=f"target {target:,.0f}")
        ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(keys))], keys)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")  # direct and LiteLLM differ by two orders of magnitude
        ax.legend(fontsize=8)

    bars(
        axes[0][1], ["c64_unary", "c256_unary", "c16_unary"], "throughput_rps", "unary throughput (log)", "req/s", 2000
    )
    bars(axes[1][0], ["c64_stream", "c16_stream"], "chunks_per_s", "streamed chunks/s (log)", "chunks/s", 50_000)
    ax = axes[1][1]
    keys = list(results.get("scenario_titles", {}))
    width = 0.8 / max(1, len(targets))
    for i, t in enumerate(targets):
        vals = [_get(results, t, k, "sut", "rss_peak_mb") or 0.0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=TARGET_NAMES[t])
    ax.axhline(300, color="red", linestyle="--", linewidth=1, label="300 MB")
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(keys))], keys, rotation=30, fontsize=8)
    ax.set_title("peak RSS of the system under test")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    fig.suptitle("inference gateway benchmark (SUT on one core; noisy shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Writes results.json, results.md and results.png (when matplotlib is there) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results["evaluation"] = evaluate(results)
    results["floor_evaluation"] = evaluate_floor(results)
    written = []
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    written.append(json_path)
    md_path = out / "results.md"
    md_path.write_text(markdown(results))
    written.append(md_path)
    png = out / "results.png"
    why = plot(results, png)
    if why is None:
        written.append(png)
    else:
        results.setdefault("meta", {})["plot"] = f"skipped: {why}"
        json_path.write_text(json.dumps(results, indent=2, default=str))
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.report results.json``."""
    p = argparse.ArgumentParser(description="rebuild results.md/png from results.json")
    p.add_argument("json", type=Path)
    a = p.parse_args(argv)
    results = json.loads(a.json.read_text())
    for path in write_all(results, a.json.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
