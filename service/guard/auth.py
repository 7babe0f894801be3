"""API keys: loading tenant and admin keys, and checking a bearer token in constant time.

Keys come from ``INFERENCE_API_KEYS`` (``tenant:token`` pairs, comma separated), from
``INFERENCE_API_KEYS_FILE`` (one ``tenant:token`` per line, ``#`` comment lines) and from
``ADMIN_API_KEYS`` (``name:token`` pairs). A name may hold several tokens, which is how a key is
rotated: add the new token, move callers over, remove the old one. No error message or log line
ever contains a token; configuration errors name the variable, the entry's position and the name.

Only SHA-256 digests of the tokens are kept. Every check hashes the presented token and compares
it with ``hmac.compare_digest`` against *every* key, without stopping at a match, so neither the
timing of a refusal nor of an acceptance tells which key (or which prefix of one) came close.
Hashing first also makes all compared values the same length, which ``compare_digest`` needs to
be constant time.

Every secret the process knows (these tokens and the upstream credentials) is also registered for
:func:`service.guard.redaction.redact`, which blanks them out of text; from then on every log record
is passed through it, so an upstream that echoes a credential in an error body cannot put it in the log.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.api.status import to_grpc_status
from service.config import Settings
from service.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
"""The tenant of every call when authentication is off."""

# Names appear in logs, metrics and error messages, so they are kept to a tame alphabet.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
_NAME = re.compile(NAME_PATTERN)
# gRPC metadata values are printable ASCII; a token with anything else could never be sent.
_TOKEN = re.compile(r"[\x21-\x7e]+")
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted with a warning: they can be guessed


class Role(enum.Enum):
    """What a key may do."""

    TENANT = "tenant"  # Chat, ChatStream, Health
    ADMIN = "admin"  # Health, GetProviderStatus


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token belongs to."""

    name: str
    role: Role


def _pairs(entries: Iterable[tuple[str, str]], role: Role) -> list[tuple[str, str, Role]]:
    """Validates ``(where, entry)`` items into ``(name, token, role)``; ``where`` locates an entry."""
    out = []
    label = "tenant" if role is Role.TENANT else "name"
    for where, entry in entries:
        name, sep, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            raise ConfigError(f"{where} must be {label}:token")
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: the {label} must be 1-64 characters of letters, digits, '.', '_', '@', '-' "
                "and start with a letter or digit"
            )
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"{where} ({label} {name!r}): the token must be printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            log.warning(
                "%s (%s %r): the token is shorter than %d characters and could be guessed",
                where,
                label,
                name,
                MIN_TOKEN_CHARS,
            )
        out.append((name, token, role))
    return out


def _env_entries(var: str, value: str) -> list[tuple[str, str]]:
    items = [item.strip() for item in value.split(",")]
    return [(f"{var} entry {i}", item) for i, item in enumerate(items, 1) if item]


def _file_entries(path: str) -> list[tuple[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"INFERENCE_API_KEYS_FILE={path} cannot be read: {why}") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((f"INFERENCE_API_KEYS_FILE {path} line {n}", line))
    if not entries:
        # An empty file is a mistake (a secret not mounted yet, a truncated write), never a wish to
        # turn authentication off: that is done by unsetting the variable.
        raise ConfigError(
            f"INFERENCE_API_KEYS_FILE={path} holds no keys (only blank or comment lines): add tenant:token "
            "lines, or unset INFERENCE_API_KEYS_FILE to run without it"
        )
    return entries


class KeyRing:
    """The configured keys; ``enabled`` is False when there are none (authentication off)."""

    __slots__ = ("_keys", "_secrets", "admin_names", "enabled", "tenant_names")

    def __init__(self, keys: list[tuple[str, str, Role]]) -> None:
        seen: dict[str, tuple[str, Role]] = {}
        for name, token, role in keys:
            if token in seen:
                other, other_role = seen[token]
                raise ConfigError(
                    f"the same token is configured for {other_role.value} {other!r} and {role.value} {name!r}; "
                    "every token must be unique"
                )
            seen[token] = (name, role)
        self._keys = tuple(
            (hashlib.sha256(token.encode()).digest(), Principal(name, role)) for name, token, role in keys
        )
        self._secrets = tuple(token for _, token, _ in keys)
        self.enabled = bool(self._keys)
        self.tenant_names = sorted({name for name, _, role in keys if role is Role.TENANT})
        self.admin_names = sorted({name for name, _, role in keys if role is Role.ADMIN})

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Loads INFERENCE_API_KEYS, INFERENCE_API_KEYS_FILE and ADMIN_API_KEYS; raises ConfigError."""
        entries = _env_entries("INFERENCE_API_KEYS", settings.inference_api_keys)
        if settings.inference_api_keys_file:
            entries += _file_entries(settings.inference_api_keys_file)
        keys = _pairs(entries, Role.TENANT)
        keys += _pairs(_env_entries("ADMIN_API_KEYS", settings.admin_api_keys), Role.ADMIN)
        return cls(keys)

    def secrets(self) -> tuple[str, ...]:
        """Every token, the file's included (``Settings.secrets()`` cannot see the file)."""
        return self._secrets

    def same_keys(self, other: KeyRing) -> bool:
        """Whether ``other`` holds exactly these keys for exactly these names (a reload changed nothing)."""
        return set(self._keys) == set(other._keys)

    def lookup(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or None; constant time in the token's value."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key, principal in self._keys:
            # No break: the loop costs the same whichever key matches, or none.
            if hmac.compare_digest(digest, key):
                found = principal
        return found


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the first ``authorization`` entry: ``""`` when malformed, None when absent."""
    for key, value in metadata:
        if key == "authorization":
            if not isinstance(value, str):
                return ""
            scheme, _, token = value.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or " " in token:
                return ""
            return token
    return None


# ----------------------------------------------------------------------------- per-method policies

_SEND = "send metadata 'authorization: Bearer <token>'"
TENANT_KEYS = "INFERENCE_API_KEYS (or INFERENCE_API_KEYS_FILE)"


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may call a method, and the prebuilt status for each way of failing."""

    roles: frozenset[Role]
    missing: grpc.Status
    malformed: grpc.Status
    invalid: grpc.Status
    denied: grpc.Status


def _policy(roles: set[Role], keys_hint: str, denied: str) -> Policy:
    def unauthenticated(what: str) -> grpc.Status:
        return to_grpc_status(UnauthenticatedError(f"{what}: {_SEND} with a token from {keys_hint}"))

    return Policy(
        frozenset(roles),
        unauthenticated("missing API key"),
        unauthenticated("malformed 'authorization' metadata, expected 'Bearer <token>'"),
        unauthenticated("the API key is not valid"),
        to_grpc_status(PermissionDeniedError(denied)),
    )


class Authenticator:
    """Checks a call's metadata against a method's policy: ``tenant``, ``any`` or ``admin``."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys
        closed = "" if keys.admin_names else "; no ADMIN_API_KEYS are configured, so it is closed"
        self.tenant = _policy(
            {Role.TENANT},
            TENANT_KEYS,
            f"admin keys may call Health and GetProviderStatus only; Chat and ChatStream need a tenant token "
            f"from {TENANT_KEYS}",
        )
        self.any = _policy({Role.TENANT, Role.ADMIN}, f"{TENANT_KEYS} or ADMIN_API_KEYS", "")
        self.admin = _policy(
            {Role.ADMIN},
            f"ADMIN_API_KEYS (GetProviderStatus is an admin RPC{closed})",
            f"GetProviderStatus needs an admin token from ADMIN_API_KEYS; tenant keys may call Chat, ChatStream "
            f"and Health{closed}",
        )

    def check(self, metadata: Sequence[tuple[str, Any]] | None, policy: Policy) -> Principal | grpc.Status:
        """The caller's principal, or the status to abort the call with."""
        token = bearer_token(metadata or ())
        if token is None:
            return policy.missing
        if not token:
            return policy.malformed
        principal = self.keys.lookup(token)
        if principal is None:
            return policy.invalid
        if principal.role not in policy.roles:
            return policy.denied
        return principal


# Redaction lives in service.guard.redaction (no gRPC imports, so status.py can use it too).
