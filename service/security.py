"""Authentication, TLS, admission control and rate limits (filled in by the security issue).

Contract with :mod:`service.server`:

* ``Security(settings)`` is built once per Gateway.
* ``check_bind()`` raises :class:`ConfigError` when the bind is unsafe.
* ``server_credentials()`` returns TLS credentials, or None for plaintext.
* ``interceptors()`` returns the server interceptors, outermost first.
* ``in_flight`` counts calls being served now.
"""

from __future__ import annotations

import grpc

from service.config import Settings


class Security:
    """No-op placeholder: no auth, no TLS, no limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.in_flight = 0

    def check_bind(self) -> None:
        """Accepts every bind for now."""

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Plaintext for now."""
        return None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """None for now."""
        return []
