"""TLS material: read, checked, and swapped without a restart.

The server's credentials are grpcio's *dynamic* SSL credentials: before every new handshake
grpc asks :meth:`TlsMaterial.fetch` whether the certificate changed. A reload (SIGHUP or a
changed file) reads and checks the new files and leaves them for the next handshake; connections
already open keep the certificate they were made with, so no call is dropped. A certificate that
does not load, or a key that does not belong to it, is refused and the previous pair stays.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.config import Settings
from service.errors import ConfigError


def read_pem(var: str, path: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming ``var`` when unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{var}={path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """One consistent set of certificate, key and (mutual TLS) client CA."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def read(cls, settings: Settings) -> TlsFiles:
        """Reads and checks TLS_CERT_FILE, TLS_KEY_FILE and TLS_CLIENT_CA_FILE.

        Raises:
            ConfigError: a file is unreadable, not PEM, or the key does not match the certificate.
        """
        cert = read_pem("TLS_CERT_FILE", settings.tls_cert_file)
        key = read_pem("TLS_KEY_FILE", settings.tls_key_file)
        client_ca = read_pem("TLS_CLIENT_CA_FILE", settings.tls_client_ca_file) if settings.tls_client_ca_file else None
        try:
            # The standard library checks that the key belongs to the certificate; grpc would only
            # fail each handshake later.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
            if client_ca is not None:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"TLS_CERT_FILE={settings.tls_cert_file} / TLS_KEY_FILE={settings.tls_key_file}"
                f"{' / TLS_CLIENT_CA_FILE=' + settings.tls_client_ca_file if client_ca else ''}: "
                f"not a usable certificate and key ({getattr(exc, 'reason', None) or exc})"
            ) from None
        return cls(cert, key, client_ca)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """grpc's form of this material."""
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.client_ca)


class TlsMaterial:
    """The served TLS files and the next ones waiting for the next handshake."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current = TlsFiles.read(settings)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # grpc may call fetch() from its own threads

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials starting with the current files."""
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self.fetch,
            require_client_authentication=self.current.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: the new configuration once, else None (no change)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Reads the files again; True when they changed (served from the next handshake on).

        Raises:
            ConfigError: the new files are not usable; the current ones stay.
        """
        files = TlsFiles.read(self.settings)
        if files == self.current:
            return False
        configuration = files.configuration()
        with self._lock:
            self._pending = configuration
            self.current = files
        return True
