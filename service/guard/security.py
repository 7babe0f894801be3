"""Authentication, tenant policy, TLS, admission control and rate limits, as one gRPC interceptor.

Contract with :mod:`service.server`:

* ``Security(settings, scope)`` is built once per Gateway (it loads the keys and TENANTS_FILE:
  ConfigError when malformed); ``scope`` says what model names mean (the router's catalogue).
* ``check_bind()`` raises :class:`ConfigError` when the bind is unsafe or a TLS file is unusable.
* ``server_credentials()`` returns TLS credentials (reloadable), or None for plaintext.
* ``interceptors()`` returns the server interceptors, outermost first.
* ``reload(trigger)`` reads the key file, TENANTS_FILE and the TLS files again; a part that does
  not load keeps its previous version (logged, audited, counted).
* ``in_flight`` counts calls being served now.

What each method needs (when keys are configured; with none, every call is tenant ``anonymous``)::

    InferenceService/Chat, ChatStream   tenant key; its policy (models); its limits (rpm, tpm,
                                        max_concurrent); then a process-wide concurrency slot
    InferenceService/Health, ListModels tenant or admin key
    InferenceService/GetProviderStatus  admin key (a tenant key gets PERMISSION_DENIED)
    grpc.health.v1, reflection          open when AUTH_EXEMPT_HEALTH (default), else any key

The interceptor itself is :class:`service.guard.interceptor.SecurityInterceptor`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from dataclasses import dataclass, field

import grpc

from service.api.status import to_grpc_status
from service.config import Settings
from service.errors import ConfigError, InvalidRequestError
from service.guard.admission import ConcurrencyLimiter
from service.guard.audit import audit
from service.guard.auth import ANONYMOUS, Authenticator, KeyRing
from service.guard.limits import InProcessLimits, LimitStore
from service.guard.policy import LiteralScope, ModelScope, Policies, TenantPolicy, load_tenants_file
from service.guard.redaction import register_secrets, url_secrets
from service.guard.tls import TlsMaterial

log = logging.getLogger(__name__)

current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant", default=ANONYMOUS)
"""The tenant of the call being served, for logs and telemetry. grpc.aio serves each call in its
own task, so a value set for one call never leaks into another and needs no reset."""


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address is reachable only from this host (loopback or a unix socket)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to anything; "" and "0.0.0.0" mean every interface


@dataclass
class ReloadResult:
    """What one reload did: the parts that changed, and the parts refused (with why)."""

    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Security:
    """Keys, tenant policies, TLS material, limits, and the interceptor that applies them.

    Building one registers every secret it knows (the environment's, the key file's, credentials
    written into upstream URLs) with :func:`service.guard.redaction.register_secrets`, so log
    records are redacted from then on.
    """

    def __init__(self, settings: Settings, scope: ModelScope | None = None, limits: LimitStore | None = None) -> None:
        self.settings = settings
        self.keys = KeyRing.from_settings(settings)
        self.auth = Authenticator(self.keys)
        self.policies = Policies.from_settings(settings)
        self.scope: ModelScope = scope or LiteralScope()
        self.limits: LimitStore = limits or InProcessLimits()
        self.slots = ConcurrencyLimiter(settings.max_concurrent_requests, settings.admission_wait_s)
        self.tls: TlsMaterial | None = None
        self.plain = False
        self._refresh()
        register_secrets(self.secrets())
        self.undecodable = to_grpc_status(
            InvalidRequestError(
                "the request could not be parsed as the method's request message (corrupt protobuf wire format, "
                "or a string field that is not UTF-8)"
            )
        )

    @property
    def in_flight(self) -> int:
        """Chat and ChatStream calls holding a concurrency slot now."""
        return self.slots.in_flight

    def _refresh(self) -> None:
        # Read on every call: no authentication and nothing in the anonymous policy means a call
        # needs only a slot.
        self.plain = not self.keys.enabled and self.policies.for_tenant(ANONYMOUS).open

    def policy_for(self, tenant: str) -> TenantPolicy:
        """The tenant's resolved policy."""
        return self.policies.for_tenant(tenant)

    def tenant_names(self) -> list[str]:
        """Every tenant a call may be attributed to (the metrics' tenant label values)."""
        return sorted({*self.keys.tenant_names, *self.policies.listed, ANONYMOUS})

    def secrets(self) -> list[str]:
        """Every secret value, including tokens from INFERENCE_API_KEYS_FILE and URL credentials."""
        s = self.settings
        in_urls = [v for url in (s.modal_web_url, s.vastai_vllm_url, s.anthropic_base_url) for v in url_secrets(url)]
        return sorted({*s.secrets(), *self.keys.secrets(), *in_urls})

    def check_bind(self) -> None:
        """Refuses a non-loopback bind without keys unless ALLOW_INSECURE_BIND; logs the auth state.

        Also reads the TLS files once, so that a bad path fails startup before any provider starts.

        Raises:
            ConfigError: the address is reachable from other hosts and nothing guards it, or a TLS
                file is unreadable or the key does not match the certificate.
        """
        if self.settings.tls_cert_file and self.tls is None:
            self.tls = TlsMaterial(self.settings)  # fail before the providers start, not at bind time
        address = self.settings.grpc_listen_address
        local = is_loopback(address)
        if self.settings.tenants_file:
            log.info("tenant policy: %s", self.policies.summary())
        if not self.keys.enabled:
            if not local and not self.settings.allow_insecure_bind:
                raise ConfigError(
                    f"GRPC_LISTEN_ADDRESS={address} is not a loopback address and no API keys are configured: "
                    "set INFERENCE_API_KEYS (or INFERENCE_API_KEYS_FILE), or ALLOW_INSECURE_BIND=true to serve "
                    "anyone who can reach it"
                )
            log.warning(
                "authentication is off (INFERENCE_API_KEYS, INFERENCE_API_KEYS_FILE and ADMIN_API_KEYS are unset): "
                "every caller is tenant %r and GetProviderStatus is open; listening on %s",
                ANONYMOUS,
                address,
            )
            return
        log.info(
            "authentication on: tenants %s, admins %s",
            self.keys.tenant_names or "none",
            self.keys.admin_names or "none",
        )
        self._warn_about_policy()
        if not self.keys.tenant_names:
            log.warning("only ADMIN_API_KEYS are configured: Chat and ChatStream are refused to every caller")
        if not local and not self.settings.tls_cert_file:
            log.warning(
                "listening on %s without TLS: API keys cross the network in clear text unless a proxy in front "
                "terminates TLS; set TLS_CERT_FILE and TLS_KEY_FILE",
                address,
            )
        if not self.settings.auth_exempt_health:
            token = self.settings.healthcheck_api_key
            if not token:
                log.warning(
                    "AUTH_EXEMPT_HEALTH=false and HEALTHCHECK_API_KEY is unset: the container health check "
                    "(python -m service.healthcheck) will be refused; give it a tenant or admin token"
                )
            elif self.keys.lookup(token) is None:
                log.warning(
                    "HEALTHCHECK_API_KEY is not one of the configured keys: the container health check will fail"
                )

    def _warn_about_policy(self) -> None:
        keyless = sorted(self.policies.listed - {*self.keys.tenant_names, ANONYMOUS})
        if keyless:
            log.warning("TENANTS_FILE has a policy for %s, which no key belongs to (a typo of a tenant name?)", keyless)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from TLS_CERT_FILE/TLS_KEY_FILE (mutual TLS with TLS_CLIENT_CA_FILE),
        reloaded by :meth:`reload`; None for plaintext.

        Raises:
            ConfigError: a file is unreadable, not PEM, or the key does not match the certificate.
        """
        if not self.settings.tls_cert_file:
            return None
        if self.tls is None:
            self.tls = TlsMaterial(self.settings)
        log.info("TLS on%s", " with client certificates required (mutual TLS)" if self.tls.current.client_ca else "")
        return self.tls.credentials()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The one interceptor doing authentication, policy and admission."""
        from service.guard.interceptor import SecurityInterceptor

        return [SecurityInterceptor(self)]

    def watched_files(self) -> dict[str, str]:
        """The files a change of which calls for :meth:`reload`, and the part each one belongs to."""
        s = self.settings
        files = {
            s.inference_api_keys_file: "keys",
            s.tenants_file: "tenants",
            s.tls_cert_file: "tls",
            s.tls_key_file: "tls",
            s.tls_client_ca_file: "tls",
        }
        return {path: part for path, part in files.items() if path}

    def reload(self, trigger: str, parts: set[str] | None = None) -> ReloadResult:
        """Reads the key file, TENANTS_FILE and the TLS files again (``parts`` of them: ``keys``,
        ``tenants``, ``tls``; None for all), each on its own.

        A part that does not load keeps its previous version: one error line names the file, the
        line and the field; the audit log records it; ``failed`` lists it.
        """
        result = ReloadResult()
        for part, load in (("keys", self._reload_keys), ("tenants", self._reload_tenants), ("tls", self._reload_tls)):
            if parts is not None and part not in parts:
                continue
            try:
                if load():
                    result.changed.append(part)
            except ConfigError as exc:
                message = " ".join(str(exc).split())  # one line, whatever the error held
                result.failed[part] = message
                log.error("reload (%s) refused, the previous %s stay in force: %s", trigger, part, message)
        for part in result.changed:
            log.info("reload (%s): new %s in force", trigger, part)
        if result.changed or result.failed or trigger == "SIGHUP":
            outcome = "failed" if result.failed else "ok"
            audit(
                "policy_reload",
                outcome,
                trigger=trigger,
                changed=",".join(result.changed) or "nothing",
                failed=",".join(result.failed),
            )
        return result

    def _reload_keys(self) -> bool:
        keys = KeyRing.from_settings(self.settings)
        if keys.enabled != self.keys.enabled:
            raise ConfigError("a reload cannot turn authentication on or off; restart the gateway to do that")
        if keys.same_keys(self.keys):
            return False
        register_secrets(keys.secrets())  # before the keys are used: a new token is never logged
        self.keys, self.auth = keys, Authenticator(keys)
        return True

    def _reload_tenants(self) -> bool:
        if not self.settings.tenants_file:
            return False
        data = load_tenants_file(self.settings.tenants_file)
        policies = Policies(self.settings, data, self.settings.tenants_file)
        if data == self.policies.data:
            return False
        self.policies = policies
        self._refresh()
        self._warn_about_policy()
        return True

    def _reload_tls(self) -> bool:
        return self.tls.reload() if self.tls is not None else False
