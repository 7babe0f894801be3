"""``python -m service.healthcheck [SERVICE]``: the standard grpc.health.v1 Check against this
service, for container and exec probes. Exit 0 when SERVING, 1 otherwise.

SERVICE is the health name to ask: none (the default) asks the overall status "", which is
readiness: SERVING only when a call can be served now. ``liveness`` is SERVING while the process
answers, whatever the providers do: use it for probes that restart the container (a Kubernetes exec
liveness probe with TLS).

It reads the service's own variables: GRPC_LISTEN_ADDRESS (a wildcard host becomes 127.0.0.1; a
``unix:`` socket is dialled as it is) and, when TLS_CERT_FILE is set, speaks TLS trusting
HEALTHCHECK_CA_FILE (default: TLS_CERT_FILE itself, right for a self-signed certificate),
presenting HEALTHCHECK_CLIENT_CERT_FILE/_KEY_FILE when the server requires client certificates,
and checking the name HEALTHCHECK_SERVER_NAME (default ``localhost``). With AUTH_EXEMPT_HEALTH=false
the health service needs a key: HEALTHCHECK_API_KEY is sent as ``authorization: Bearer <token>``.

It stays a few lines of grpc on purpose: it runs every few seconds in the container, so it does not
import the service's settings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def target_of(address: str) -> str:
    """The address to dial for a listen address (wildcards become loopback)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return address
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(env: Mapping[str, str], timeout_s: float = 4.0, service: str = "") -> bool:
    """True when the health name ``service`` ("" = the overall status) answers SERVING."""
    target = target_of(env.get("GRPC_LISTEN_ADDRESS", "127.0.0.1:50051"))
    if env.get("TLS_CERT_FILE"):
        credentials = grpc.ssl_channel_credentials(
            _read(env.get("HEALTHCHECK_CA_FILE") or env["TLS_CERT_FILE"]),
            _read(env.get("HEALTHCHECK_CLIENT_KEY_FILE", "")),
            _read(env.get("HEALTHCHECK_CLIENT_CERT_FILE", "")),
        )
        name = env.get("HEALTHCHECK_SERVER_NAME", "localhost")
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    token = env.get("HEALTHCHECK_API_KEY", "").strip()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata
            )
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    sys.exit(0 if check(os.environ, service=sys.argv[1] if len(sys.argv) > 1 else "") else 1)
