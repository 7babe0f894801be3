"""``python -m service`` / ``inference-gateway``: parse config, set up telemetry, serve."""

from __future__ import annotations

import asyncio
import logging
import sys

from service.config import Settings
from service.errors import ConfigError


def main() -> int:
    """Entry point; exit code 2 on bad configuration."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"configuration error: {line}", file=sys.stderr)
        return 2
    from service.observe.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from service.shared.workers import Supervisor, is_worker, watch_supervisor

    if settings.workers > 1 and not is_worker():
        return Supervisor(settings).run()
    watch_supervisor(settings.shutdown_grace_s)  # a worker stops with its supervisor, however it died
    from service.server import serve

    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, only slower
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(settings))
    except ConfigError as exc:
        logging.getLogger("service").error("configuration error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
