"""The per-core targets of issue 15, each relative to the floor measured in the same run.

The floor (``bench.floor``) is a bare grpc.aio server answering from memory on the same core with
the same loads: what gRPC and Python cost per call and per message before any gateway code runs.
``evaluate_floor`` gives one row per target (floor value, gateway value, the relative figure, met
or not); ``markdown_floor`` renders them with the ``WORKERS=1`` / ``WORKERS=2`` runs.

The relay floors (``bench.floor --relay``, stage ``relay``) split the gap: the floor plus the upstream
leg as a raw HTTP exchange (what any relay pays in the kernel and the loop), then through the
gateway's own provider (request body, pool, llhttp, SSE and JSON decoding). ``relay_steps`` gives,
per figure, the four servers in order and what each step adds, and the budget a target leaves for
the gateway's own per-call work once the upstream leg is paid.
"""

from __future__ import annotations

from typing import Any

CPU_RATIO_MAX = 1.8  # unary CPU per call, gateway / floor
C1_P50_EXTRA_MAX_MS = 0.25  # c=1 p50, gateway minus floor
STREAM_SHARE_MIN = 0.5  # one-token messages/s, gateway / floor
WORKERS_SPEEDUP_MIN = 1.7  # WORKERS=2 / WORKERS=1 throughput


def _get(results: dict[str, Any], target: str, scenario: str, *path: str) -> float | None:
    node: Any = results.get("targets", {}).get(target, {}).get("scenarios", {}).get(scenario)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, (int, float)) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _workers_run(results: dict[str, Any], key: str) -> dict[str, Any]:
    run = results.get("workers", {}).get("runs", {}).get(key)
    return run if isinstance(run, dict) and "throughput_rps" in run else {}


def per_core_rps(run: dict[str, Any]) -> float | None:
    """Requests/s per core-second the server processes used (throughput / (CPU % / 100))."""
    cpu = (run.get("sut") or {}).get("cpu_util_pct")
    return None if not run or not cpu else float(run["throughput_rps"]) / (float(cpu) / 100.0)


def evaluate_floor(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: floor, gateway, relative value, threshold, met (None = not measured)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, threshold: str, floor: float | None, gw: float | None, value: float | None, unit: str,
            ok: bool | None, note: str = "") -> None:  # fmt: skip
        rows.append(
            {"target": name, "threshold": threshold, "floor": floor, "gateway": gw, "value": value, "unit": unit,
             "met": ok, "note": note}
        )  # fmt: skip

    fl, gw = (_get(results, t, "c64_unary", "sut", "cpu_us_per_request") for t in ("floor", "gateway"))
    v = _ratio(gw, fl)
    fl256, gw256 = (_get(results, t, "c256_unary", "sut", "cpu_us_per_request") for t in ("floor", "gateway"))
    r256 = _ratio(gw256, fl256)
    row(
        "unary CPU per call (c=64, server saturated), us",
        f"<= {CPU_RATIO_MAX}x floor",
        fl,
        gw,
        v,
        "x floor",
        None if v is None else v <= CPU_RATIO_MAX,
        f"c=256: {_f(gw256)} vs {_f(fl256)} us = {_f(r256)}x" if r256 is not None else "",
    )
    fl, gw = (_get(results, t, "c1_unary", "latency_ms", "p50") for t in ("floor", "gateway"))
    direct = _get(results, "direct", "c1_unary", "latency_ms", "p50")
    v = None if fl is None or gw is None else gw - fl
    note = ""
    if direct is not None and fl is not None and gw is not None:
        note = f"added over direct HTTP: floor +{fl - direct:.3f} ms, gateway +{gw - direct:.3f} ms"
    row(
        "c=1 unary latency p50, ms",
        f"<= floor + {C1_P50_EXTRA_MAX_MS} ms",
        fl,
        gw,
        v,
        "ms over floor",
        None if v is None else v <= C1_P50_EXTRA_MAX_MS,
        note,
    )
    fl, gw = (_get(results, t, "c256_stream_paced", "chunks_per_s") for t in ("floor", "gateway"))
    v = _ratio(gw, fl)
    fl_cpu, gw_cpu = (_get(results, t, "c256_stream_paced", "sut", "cpu_util_pct") for t in ("floor", "gateway"))
    row(
        "one-token messages/s (c=256 streams, 1 token / 2 ms)",
        f">= {STREAM_SHARE_MIN:.0%} of floor",
        fl,
        gw,
        v,
        "x floor",
        None if v is None else v >= STREAM_SHARE_MIN,
        f"server CPU: floor {_f(fl_cpu, 0)} %, gateway {_f(gw_cpu, 0)} %",
    )
    one, two = _workers_run(results, "gateway_1"), _workers_run(results, "gateway_2")
    f1, f2 = _workers_run(results, "floor_1"), _workers_run(results, "floor_2")
    v = _ratio(two.get("throughput_rps"), one.get("throughput_rps"))
    fv = _ratio(f2.get("throughput_rps"), f1.get("throughput_rps"))
    eff = _ratio(per_core_rps(two), per_core_rps(one))
    note = ""
    if two:
        note = (
            f"floor 2 vs 1 processes: {_f(fv)}x; gateway req/s per core used, 2 vs 1 workers: {_f(eff)}x; "
            f"machine busy with 2 workers {_f(two.get('machine_cpu_busy_pct'), 0)} % of all cores"
        )
    row(
        "WORKERS=2 throughput vs WORKERS=1 (nothing pinned), req/s",
        f">= {WORKERS_SPEEDUP_MIN}x",
        one.get("throughput_rps"),
        two.get("throughput_rps"),
        v,
        "x one worker",
        None if v is None else v >= WORKERS_SPEEDUP_MIN,
        note,
    )
    return rows


RELAY_STEPS = (
    ("floor", "floor: bare grpc.aio from memory"),
    ("relay_raw", "+ upstream leg, raw exchange"),
    ("relay_provider", "+ upstream leg through the gateway's provider"),
    ("gateway", "gateway"),
)


def relay_steps(results: dict[str, Any]) -> dict[str, Any]:
    """The four servers' figures (unary CPU per call at c=64, c=1 p50, one-token messages/s) and
    the budgets the per-core targets leave beyond the provider relay; {} without the relay floors."""
    targets = results.get("targets", {})
    if not all(t in targets for t, _ in RELAY_STEPS):
        return {}
    figures = {
        t: {
            "cpu_us": _get(results, t, "c64_unary", "sut", "cpu_us_per_request"),
            "c1_p50_ms": _get(results, t, "c1_unary", "latency_ms", "p50"),
            "msgs_per_s": _get(results, t, "c256_stream_paced", "chunks_per_s"),
        }
        for t, _ in RELAY_STEPS
    }
    out: dict[str, Any] = {"figures": figures}
    fl, prov, gw = (figures[t]["cpu_us"] for t in ("floor", "relay_provider", "gateway"))
    if fl and prov and gw:
        out["cpu"] = {
            "allowed_us": CPU_RATIO_MAX * fl,
            "left_after_provider_us": CPU_RATIO_MAX * fl - prov,
            "gateway_beyond_provider_us": gw - prov,
        }
    fl, prov, gw = (figures[t]["c1_p50_ms"] for t in ("floor", "relay_provider", "gateway"))
    if fl and prov and gw:
        out["c1"] = {
            "allowed_ms": fl + C1_P50_EXTRA_MAX_MS,
            "left_after_provider_ms": fl + C1_P50_EXTRA_MAX_MS - prov,
            "gateway_beyond_provider_ms": gw - prov,
        }
    return out


def markdown_relays(results: dict[str, Any]) -> list[str]:
    """The 'Where the gateway's cost goes' section (empty without the relay floors)."""
    steps = relay_steps(results)
    if not steps:
        return []
    figs = steps["figures"]
    fl = figs["floor"]
    out = [
        "## Where the gateway's cost goes (relay floors)",
        "",
        "The floor has no upstream; the gateway cannot avoid one. The relay floors are the floor plus that leg "
        "and nothing else (`bench/floor.py --relay`): first as a raw exchange (fixed request bytes on kept-alive "
        "connections, the answer only scanned for its end), then through the gateway's own provider.",
        "",
        "| Server | unary CPU per call, c=64 (us) | x floor | c=1 unary p50 (ms) | over floor (ms) "
        "| one-token messages/s, c=256 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, title in RELAY_STEPS:
        f = figs[key]
        ratio = _ratio(f["cpu_us"], fl["cpu_us"])
        over = None if f["c1_p50_ms"] is None or fl["c1_p50_ms"] is None else f["c1_p50_ms"] - fl["c1_p50_ms"]
        out.append(
            f"| {title} | {_f(f['cpu_us'], 0)} | {_f(ratio)} | {_f(f['c1_p50_ms'], 3)} | {_f(over, 3)} "
            f"| {_f(f['msgs_per_s'], 0)} |"
        )
    cpu, c1 = steps.get("cpu"), steps.get("c1")
    out.append("")
    if cpu:
        out.append(
            f"At {CPU_RATIO_MAX}x the floor a unary call may cost {cpu['allowed_us']:.0f} us of CPU; the relay through "
            f"the gateway's provider already costs {figs['relay_provider']['cpu_us']:.0f} us, which leaves "
            f"{cpu['left_after_provider_us']:.0f} us for everything else the gateway does per call (authentication, "
            f"validation, tenant policy and limits, routing and circuits, ledger and cost, telemetry, the access "
            f"line); that measures {cpu['gateway_beyond_provider_us']:.0f} us here."
        )
    if c1:
        out.append(
            f"At c=1 the target allows a p50 of {c1['allowed_ms']:.3f} ms; the provider relay is at "
            f"{figs['relay_provider']['c1_p50_ms']:.3f} ms ({c1['left_after_provider_ms']:+.3f} ms left), the gateway "
            f"{c1['gateway_beyond_provider_ms']:+.3f} ms beyond it."
        )
    return [*out, ""]


def _f(v: Any, digits: int = 2) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"


def markdown_floor(results: dict[str, Any]) -> list[str]:
    """The 'Per-core targets vs the floor' and 'Workers' sections (empty when the floor did not run)."""
    rows = results.get("floor_evaluation") or []
    if not rows:
        return []
    verdict = {None: "n/a (not measured)", True: "**met**", False: "**not met**"}
    out = [
        "## Per-core targets vs the floor (issue 15)",
        "",
        "The floor is a bare grpc.aio server of the same proto answering from memory (`bench/floor.py`), on the "
        "same core under the same loads in this run: what one gRPC call or message costs before any gateway code.",
        "",
        "| Target | Threshold | Floor | Gateway | Measured | Verdict | Note |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['target']} | {r['threshold']} | {_f(r['floor'])} | {_f(r['gateway'])} "
            f"| {_f(r['value'])} {r['unit']} | {verdict[r['met']]} | {r['note']} |"
        )
    runs = results.get("workers", {}).get("runs", {})
    if runs:
        out += [
            "",
            f"### Workers ({results['workers'].get('scenario', '')}; servers, load generator and upstream "
            "unpinned on the same 2 cores)",
            "",
            "| Server | req/s | p50 ms | p99 ms | errors | server CPU % (all processes) | req/s per core used "
            "| load generator CPU % | upstream CPU % | machine busy % (of all cores) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        names = {"floor_1": "floor, 1 process", "floor_2": "floor, 2 processes", "gateway_1": "gateway, WORKERS=1",
                 "gateway_2": "gateway, WORKERS=2"}  # fmt: skip
        for key, run in runs.items():
            if "error" in run:
                out.append(f"| {names.get(key, key)} | failed: {run['error'][:200]} ||||||||| ")
                continue
            lat = run.get("latency_ms") or {}
            out.append(
                f"| {names.get(key, key)} | {_f(run['throughput_rps'], 0)} | {_f(lat.get('p50'), 3)} "
                f"| {_f(lat.get('p99'), 3)} | {run.get('errors', '-')} "
                f"| {_f((run.get('sut') or {}).get('cpu_util_pct'), 0)} "
                f"| {_f(per_core_rps(run), 0)} | {_f(run.get('client_cpu_util_pct'), 0)} "
                f"| {_f(run.get('upstream_cpu_util_pct'), 0)} | {_f(run.get('machine_cpu_busy_pct'), 0)} |"
            )
    return [*out, "", *markdown_relays(results)]
