"""``python -m clients usage``: the gateway's ledger as a table, JSON, or a chart of daily cost.

Dates and the grouping are checked before any call (one line, exit 2), and so is ``--plot``:
matplotlib is imported only then, and its absence is one line and exit 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.errors import ClientConfigError
from clients.sync_client import InferenceClient
from clients.types import UsageRow
from clients.usage import DEFAULT_BY, DIMENSIONS, daily_cost, describe, dimensions, total, window

EXAMPLES = """examples:
  INFERENCE_API_KEY=<admin token> python -m clients usage     # this month, by tenant, provider, day
  python -m clients usage --by provider,model --since 2026-11-01 --until 2026-11-15
  python -m clients usage --by tenant --since 2026-10 --until 2026-10      # the whole of October
  python -m clients usage --by "" --tenant acme                              # one row: acme's month
  python -m clients usage --json                                             # the rows as JSON
  python -m clients usage --plot usage.png                                   # also draw daily cost per provider

Dates are UTC: YYYY-MM-DD, YYYY-MM or ISO 8601 (2026-11-01T09:00Z). A day or month given to
--until is included whole; unset dates mean the current month. In the table, "-" as a tenant is
cost booked to no tenant (a GPU provider's idle time until it scales down), and as a provider,
calls no provider was asked to serve. An admin key sees every tenant; a tenant key its own only.
--plot needs matplotlib and groups by day and provider whatever --by says.
"""

_NUMBERS = ("requests", "failed", "prompt_tokens", "completion_tokens", "cost_usd")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Adds the ``usage`` subcommand (its flags take the connection options too, via ``common``)."""
    usage = sub.add_parser(
        "usage",
        parents=[common],
        help="print usage and cost from the ledger (admin key, or a tenant key for its own)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    usage.add_argument(
        "--by",
        default=",".join(DEFAULT_BY),
        metavar="DIMS",
        help=f'group by these, comma-separated: {", ".join(DIMENSIONS)} (default %(default)s; "" for one row)',
    )
    usage.add_argument("--since", metavar="DATE", help="start, included (default: the first of this month, UTC)")
    usage.add_argument("--until", metavar="DATE", help="end; a day or month is included whole (default: this month)")
    usage.add_argument("--tenant", metavar="NAME", help="only this tenant")
    usage.add_argument("--json", action="store_true", help="print the rows as JSON")
    usage.add_argument("--plot", metavar="FILE", help="also draw daily cost per provider into FILE (.png, .svg, .pdf)")


def run(client: InferenceClient, args: argparse.Namespace) -> int:
    """Runs ``usage``; returns the exit code.

    Raises:
        ClientConfigError: A bad date, dimension or plot file, or no matplotlib for ``--plot``.
        InferenceError: The call failed.
    """
    try:
        dims = dimensions(args.by, "--by")
        start, end = window(args.since, args.until, names=("--since", "--until"))
    except ValueError as exc:
        raise ClientConfigError(str(exc)) from None
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        from clients import usage_plot  # only for --plot: it is what needs matplotlib

        usage_plot.check_target(plot)
    rows = _ask(client, args, dims)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(f"usage {describe(start, end)} (UTC){f', tenant {args.tenant}' if args.tenant else ''}")
        print("\n".join(table(rows, dims)) if rows else "no usage recorded")
    if plot is not None:
        if not {"day", "provider"} <= set(dims):
            # The chart needs both; asked again rather than guessed from another grouping.
            rows = _ask(client, args, ("day", "provider"))
        costs = daily_cost(rows)
        usage_plot.save(usage_plot.draw(costs, start, end, tenant=args.tenant), plot)
        print(f"wrote {plot}: daily cost per provider, {describe(start, end)}", file=sys.stderr)
    return 0


def _ask(client: InferenceClient, args: argparse.Namespace, dims: Sequence[str]) -> list[UsageRow]:
    return client.usage(since=args.since, until=args.until, by=dims, tenant=args.tenant, timeout_s=client.timeout_s)


def table(rows: Sequence[UsageRow], dims: Sequence[str]) -> list[str]:
    """The rows as aligned lines: a header, one line per row, a rule, and a totals line.

    Dimensions are left-aligned, numbers right-aligned with thousands separators, cost in USD to
    four places (a call often costs less than a cent). Without dimensions the one row is the total.
    """
    labels = list(dims) or [""]
    lines = [[*labels, *_NUMBERS]]
    if dims:
        lines += [[_cell(getattr(r, d)) for d in dims] + _numbers(r) for r in rows]
    lines.append(["total", *[""] * (len(labels) - 1), *_numbers(total(rows))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def render(line: list[str]) -> str:
        cells = [
            cell.ljust(width) if i < len(labels) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [render(line) for line in lines]
    out.insert(len(out) - 1, "-" * len(out[0]))
    return out


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _numbers(r: UsageRow) -> list[str]:
    return [
        f"{r.requests:,}",
        f"{r.failed_requests:,}",
        f"{r.prompt_tokens:,}",
        f"{r.completion_tokens:,}",
        f"{r.cost_usd:,.4f}",
    ]
