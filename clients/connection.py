"""Where and how a client connects: arguments first, then ``INFERENCE_*`` environment variables.

``INFERENCE_TARGET`` (host:port), ``INFERENCE_API_KEY`` (bearer token), ``INFERENCE_CA_FILE``
(PEM of the CA that signed the server's certificate; turns TLS on) and ``INFERENCE_LOAD_BALANCING``
(``round_robin`` spreads calls over every address a target resolves to) are the defaults of both
clients and the CLI, so a script and a shell share one configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from clients.errors import ClientConfigError

DEFAULT_TARGET = "127.0.0.1:50051"

TARGET_ENV = "INFERENCE_TARGET"
API_KEY_ENV = "INFERENCE_API_KEY"
CA_FILE_ENV = "INFERENCE_CA_FILE"
LOAD_BALANCING_ENV = "INFERENCE_LOAD_BALANCING"

LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")
"""gRPC's built-in policies: ``pick_first`` (gRPC's default) sends every call over one connection to
the first address that answers; ``round_robin`` connects to every address and spreads calls."""


@dataclass(frozen=True, slots=True)
class Connection:
    """A resolved connection.

    Attributes:
        target: ``host:port`` (or any gRPC target such as ``dns:///name:port``).
        api_key: Bearer token sent with every call; None sends none.
        root_certificates: PEM of the CA to trust; with ``tls`` the system roots when None.
        private_key: Client key PEM, for mutual TLS.
        certificate_chain: Client certificate PEM, for mutual TLS.
        tls: Connect with TLS.
        server_name: Name to check the server's certificate against, if not the target's host.
        load_balancing: A policy of :data:`LOAD_BALANCING_POLICIES`, or None for gRPC's default
            (``pick_first``). Only matters for a target that resolves to several addresses.
    """

    target: str
    api_key: str | None = field(default=None, repr=False)
    root_certificates: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    tls: bool = False
    server_name: str | None = None
    load_balancing: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the API key."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    @property
    def options(self) -> list[tuple[str, str]]:
        """Channel options."""
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        if self.load_balancing:
            # The channel's default service config, the way gRPC documents choosing a policy; the
            # older "grpc.lb_policy_name" argument loses to any service config the resolver returns.
            config = json.dumps({"loadBalancingConfig": [{self.load_balancing: {}}]})
            options.append(("grpc.service_config", config))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials (call only when ``tls``)."""
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def resolve_connection(
    target: str | None = None,
    *,
    api_key: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    tls: bool | None = None,
    server_name: str | None = None,
    load_balancing: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """Fills what the caller left out from the environment.

    Args:
        target: ``host:port``; ``INFERENCE_TARGET``, else 127.0.0.1:50051, when None.
        api_key: Bearer token; ``INFERENCE_API_KEY`` when None; ``""`` sends none.
        ca_file: CA certificate file; ``INFERENCE_CA_FILE`` when None and no
            ``root_certificates``; ``""`` reads none.
        root_certificates: CA PEM bytes; wins over ``ca_file``.
        private_key: Client key PEM (mutual TLS).
        certificate_chain: Client certificate PEM (mutual TLS).
        tls: TLS with the system roots; TLS is on anyway whenever a CA is given.
        server_name: Certificate name override.
        load_balancing: ``round_robin`` or ``pick_first``; ``INFERENCE_LOAD_BALANCING`` when None,
            else gRPC's default (``pick_first``).
        env: Where to read the defaults; ``os.environ`` when None.

    Returns:
        The connection.

    Raises:
        ClientConfigError: The CA file cannot be read, or the load-balancing policy is unknown; the
            message names the value and where it came from.
    """
    environ = os.environ if env is None else env
    resolved_target = target or environ.get(TARGET_ENV, "").strip() or DEFAULT_TARGET
    key = environ.get(API_KEY_ENV, "").strip() if api_key is None else api_key
    if root_certificates is None:
        source = "--ca / ca_file" if ca_file is not None else CA_FILE_ENV
        path = os.fspath(ca_file) if ca_file is not None else environ.get(CA_FILE_ENV, "").strip()
        root_certificates = _read_ca(path, source) if path else None
    policy = _policy(load_balancing, environ)
    return Connection(
        target=resolved_target,
        api_key=key or None,
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
        tls=bool(tls) or root_certificates is not None,
        server_name=server_name,
        load_balancing=policy,
    )


def _policy(load_balancing: str | None, environ: Mapping[str, str]) -> str | None:
    source = "--lb / load_balancing" if load_balancing is not None else LOAD_BALANCING_ENV
    policy = (environ.get(LOAD_BALANCING_ENV, "") if load_balancing is None else load_balancing).strip()
    if policy and policy not in LOAD_BALANCING_POLICIES:
        raise ClientConfigError(
            f"unknown load-balancing policy {policy!r} (from {source}); use one of {', '.join(LOAD_BALANCING_POLICIES)}"
        )
    return policy or None


def _read_ca(path: str, source: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read the CA file {path!r} (from {source}): {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ClientConfigError(f"the CA file {path!r} (from {source}) holds no PEM certificate")
    return data
