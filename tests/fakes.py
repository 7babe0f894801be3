"""Fakes shared by several test modules: a canned in-process provider and a throwaway PKI."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from service.guard.security import current_tenant
from service.providers.base import ChatRequest, ChatResult, FinishReason, HealthReport, StreamEnd, StreamItem, Usage

CANNED_USAGE = Usage(3, 5)


class CannedProvider:
    """A provider answering at once with canned text; with ``gate`` set, every call waits for it.

    Records the tenant each call ran as (``current_tenant``), and counts open streams.
    """

    kind = "fake"
    endpoint = "http://fake.invalid"
    default_model = "canned-model"
    scale_to_zero = False
    image_input = True

    def __init__(
        self,
        name: str = "fake",
        *,
        gate: asyncio.Event | None = None,
        usage: Usage = CANNED_USAGE,
        deltas: tuple[str, ...] = ("canned ", "answer"),
    ) -> None:
        self.name = name
        self.gate = gate
        self.pause_before_delta = 0  # streams wait on ``gate`` before this delta
        self.usage = usage
        self.deltas = deltas
        self.tenants: list[str] = []
        self.open_streams = 0
        self.calls = 0

    async def start(self) -> None:
        pass

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        self.tenants.append(current_tenant.get())
        if self.gate is not None:
            await self.gate.wait()
        return ChatResult("canned-1", self.default_model, "".join(self.deltas), FinishReason.STOP, self.usage)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        self.calls += 1
        self.tenants.append(current_tenant.get())
        self.open_streams += 1
        try:
            for i, text in enumerate(self.deltas):
                if self.gate is not None and i == self.pause_before_delta:
                    await self.gate.wait()
                yield text
            yield StreamEnd("canned-1", self.default_model, FinishReason.STOP, self.usage)
        finally:
            self.open_streams -= 1

    async def check_health(self, timeout_s: float) -> HealthReport:
        return HealthReport(ok=True, latency_s=0.0)

    async def aclose(self) -> None:
        pass


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclasses.dataclass
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    ca_file: Path


def issue_pki(tmp: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: Any, ca: bool
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("test CA", ca_key, None, ca_key, True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    server = cert("localhost", server_key, ca_cert, ca_key, False)
    client = cert("client-alpha", client_key, ca_cert, ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp / "server.pem").write_bytes(server.public_bytes(pem))
    (tmp / "server.key").write_bytes(key_pem(server_key))
    return Pki(
        ca=ca_cert.public_bytes(pem),
        server_cert=tmp / "server.pem",
        server_key=tmp / "server.key",
        client_cert=client.public_bytes(pem),
        client_key=key_pem(client_key),
        ca_file=tmp / "ca.pem",
    )
