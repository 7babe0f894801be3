"""Per-tenant policy: ``TENANTS_FILE`` (TOML, read with :mod:`tomllib`, validated by pydantic).

::

    [defaults]                       # tenants not listed below, and the anonymous tenant
    rpm = 60

    [tenants.acme]
    rpm = 600                        # requests per minute, refilled smoothly
    burst = 60                       # requests at once (default rpm / 10, at least 1)
    tpm = 200000                     # tokens per minute, prompt + completion
    max_concurrent = 8               # open calls at once, streams included
    models = ["qwen2.5-7b"]          # catalogue names or model ids it may ask for; absent or empty = all
    providers = ["modal", "vastai"]  # providers its calls may reach; absent = all
    monthly_budget_usd = 50          # kept for the spend report; not enforced here

A key left out of a tenant's table comes from ``[defaults]``, then from the environment
(``RATE_LIMIT_RPM`` / ``RATE_LIMIT_TPM``), else it is off. Keys stay in ``INFERENCE_API_KEYS`` /
``INFERENCE_API_KEYS_FILE``: this file holds no secret. A file that does not parse or validate is
a :class:`ConfigError` naming the line and the field; at a reload the previous policy stays.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from service.config import Settings
from service.errors import ConfigError
from service.guard.auth import ANONYMOUS, NAME_PATTERN

TenantName = Annotated[str, StringConstraints(pattern=f"^{NAME_PATTERN}$")]
ProviderName = Literal["modal", "vastai", "anthropic", "local"]
Count = Annotated[int, Field(ge=0)]


class TenantTable(BaseModel):
    """One ``[tenants.<name>]`` (or ``[defaults]``) table; None means "not set here"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: Count | None = None
    burst: Annotated[int, Field(gt=0)] | None = None
    tpm: Count | None = None
    max_concurrent: Count | None = None
    models: tuple[Annotated[str, StringConstraints(min_length=1)], ...] | None = None
    providers: tuple[ProviderName, ...] | None = None
    monthly_budget_usd: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class TenantsFile(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: TenantTable = TenantTable()
    tenants: dict[TenantName, TenantTable] = {}


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What one tenant may do, every key resolved (0 = that limit is off; None = everything)."""

    tenant: str
    rpm: int = 0
    burst: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    models: frozenset[str] | None = None
    providers: frozenset[str] | None = None
    monthly_budget_usd: float | None = None

    @property
    def limited(self) -> bool:
        """Some rate or concurrency limit applies."""
        return bool(self.rpm or self.tpm or self.max_concurrent)

    @property
    def open(self) -> bool:
        """No limit, no restriction and no budget: the call needs no per-tenant work at all."""
        return not self.limited and self.models is None and self.providers is None and self.monthly_budget_usd is None


current_policy: ContextVar[TenantPolicy | None] = ContextVar("current_policy", default=None)
"""The policy of the call being served (None: no restriction), set by the security interceptor."""


def allowed_providers() -> frozenset[str] | None:
    """The providers the current call's tenant may reach (None: all), for ``Router.chat/stream``."""
    policy = current_policy.get()
    return None if policy is None else policy.providers


def _resolve(tenant: str, own: TenantTable, defaults: TenantTable, settings: Settings) -> TenantPolicy:
    def pick(name: str) -> Any:
        value = getattr(own, name)
        return getattr(defaults, name) if value is None else value

    rpm = pick("rpm")
    rpm = settings.rate_limit_rpm if rpm is None else rpm
    tpm = pick("tpm")
    tpm = settings.rate_limit_tpm if tpm is None else tpm
    burst = pick("burst") or max(1, rpm // 10)  # smooth: a tenth of a minute's requests at once
    models = pick("models")
    providers = pick("providers")
    return TenantPolicy(
        tenant=tenant,
        rpm=rpm,
        burst=burst if rpm else 0,
        tpm=tpm,
        max_concurrent=pick("max_concurrent") or 0,
        models=frozenset(models) if models else None,  # absent or empty: every model
        providers=None if providers is None else frozenset(providers),
        monthly_budget_usd=pick("monthly_budget_usd"),
    )


class Policies:
    """Every tenant's resolved policy; tenants not in the file get ``[defaults]``."""

    def __init__(self, settings: Settings, data: TenantsFile | None = None, source: str = "") -> None:
        data = data or TenantsFile()
        self.data = data
        self.source = source
        self.listed = frozenset(data.tenants)
        self._default = _resolve(ANONYMOUS, TenantTable(), data.defaults, settings)
        self._defaults_table = data.defaults
        self._settings = settings
        self._by_tenant = {name: _resolve(name, table, data.defaults, settings) for name, table in data.tenants.items()}
        self._anonymous = self._by_tenant.get(ANONYMOUS, self._default)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policies:
        """Reads TENANTS_FILE (or only the environment's limits when it is unset).

        Raises:
            ConfigError: the file cannot be read, is not TOML, or does not validate.
        """
        path = settings.tenants_file
        if not path:
            return cls(settings)
        return cls(settings, load_tenants_file(path), path)

    def for_tenant(self, tenant: str) -> TenantPolicy:
        """The tenant's policy: its own table, else ``[defaults]``."""
        found = self._by_tenant.get(tenant)
        if found is not None:
            return found
        if tenant == ANONYMOUS:
            return self._anonymous
        # Built once per unlisted tenant name (names come from the key ring, so this stays small).
        policy = self._by_tenant[tenant] = _resolve(tenant, TenantTable(), self._defaults_table, self._settings)
        return policy

    def summary(self) -> str:
        """One line for the log: where the policy came from and who has a table."""
        where = f"TENANTS_FILE={self.source}" if self.source else "RATE_LIMIT_RPM/RATE_LIMIT_TPM only"
        return f"{where}; tenants with their own policy: {sorted(self.listed) or 'none'}"


class ModelScope(Protocol):
    """What a model name means in this gateway (implemented over the router's catalogue)."""

    def aliases(self, model: str) -> frozenset[str]:
        """Names that mean the same model: a catalogue name and its model ids, or an id and the
        catalogue names routing to it (always including ``model``)."""
        ...

    def defaults(self, providers: frozenset[str] | None) -> frozenset[str]:
        """The models a call naming none may be served with, on the given providers (None: all)."""
        ...


class LiteralScope:
    """A scope without a catalogue: a name means only itself, and the default is not known."""

    def aliases(self, model: str) -> frozenset[str]:
        """Just ``model``."""
        return frozenset((model,))

    def defaults(self, providers: frozenset[str] | None) -> frozenset[str]:
        """Nothing known: an empty model is not checked."""
        return frozenset()


def model_denial(policy: TenantPolicy, model: str, scope: ModelScope) -> str | None:
    """Why the tenant may not ask for ``model`` (None when it may)."""
    allowed = policy.models
    if allowed is None:
        return None
    if model:
        if scope.aliases(model) & allowed:
            return None
        return (
            f"tenant {policy.tenant!r} may not use model {model!r}; its policy (TENANTS_FILE) allows {sorted(allowed)}"
        )
    outside = sorted(m for m in scope.defaults(policy.providers) if not scope.aliases(m) & allowed)
    if not outside:
        return None
    return (
        f"tenant {policy.tenant!r} must name a model: the default ({', '.join(outside)}) is not one its policy "
        f"(TENANTS_FILE) allows, which are {sorted(allowed)}"
    )


# ----------------------------------------------------------------------------- loading


def load_tenants_file(path: str) -> TenantsFile:
    """Parses and validates ``path``; raises ConfigError naming the line and the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"TENANTS_FILE={path} cannot be read: {why}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TENANTS_FILE={path} is not valid TOML: {exc}") from None
    try:
        return TenantsFile.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, text) for error in exc.errors(include_url=False)]
        raise ConfigError(f"TENANTS_FILE={path}: {'; '.join(problems)}") from None


def _describe(error: Mapping[str, Any], text: str) -> str:
    loc = [str(p) for p in error["loc"]]
    # A tuple field's item index is not a key: report the field (models[2] -> models); a bad
    # table name is reported at the table ([key] marks pydantic's check of a dict's keys).
    name_error = loc[-1:] == ["[key]"]
    keys = [p for p in loc if not p.isdigit() and p != "[key]"]
    field = ".".join(keys) or "(top level)"
    line = _line_of(text, keys)
    where = f"line {line}: " if line else ""
    if error["type"] == "extra_forbidden":
        known = "defaults, tenants" if len(keys) == 1 else ", ".join(TenantTable.model_fields)
        return f"{where}{field}: not a known key (known: {known})"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" = {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}{field}{shown}: must be a finite number"
    message = str(error["msg"])
    if name_error:
        return f"{where}{field}: {_NAME_RULE}"
    return f"{where}{field}{shown}: {message}"


_NAME_RULE = "tenant names are 1-64 letters, digits, '.', '_', '@', '-', starting with a letter or digit"
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


def _unquote(part: str) -> str:
    part = part.strip()
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


def _line_of(text: str, keys: list[str]) -> int | None:
    """The 1-based line where ``keys`` (e.g. tenants, acme, rpm) is written, for error messages only
    (tomllib gives values, not positions). Best effort: the key inside its table, else the table."""
    lines = text.splitlines()
    headers: list[tuple[int, list[str]]] = []
    for n, line in enumerate(lines, 1):
        header = _HEADER.match(line)
        if header:
            headers.append((n, [_unquote(p) for p in header.group(1).split(".")]))
    for n, path in headers:
        if path == keys:  # the path is a table of its own: [tenants.acme]
            return n
    table, key = keys[:-1], keys[-1] if keys else ""
    current: list[str] = []
    for n, line in enumerate(lines, 1):
        header = _HEADER.match(line)
        if header:
            current = [_unquote(p) for p in header.group(1).split(".")]
            continue
        found = _KEY.match(line)
        if current == table and found and _unquote(found.group(1)) == key:
            return n
    return next((n for n, path in headers if path == table or path[: len(keys)] == keys), None)
