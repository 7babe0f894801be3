"""The audit log: one JSON line (logger ``service.audit``) per security-relevant event.

Events: ``authentication`` (a refused key), ``permission`` (a valid key refused a method, a model
or every provider), ``admin_call`` (GetProviderStatus and other admin RPCs, allowed), and
``policy_reload`` (keys, tenant policy or TLS reloaded, or a reload refused). Each line has the
time (UTC, ISO 8601), the peer address, the tenant (empty when unknown), the method, the outcome
and a reason. A token is never written: refusals name the kind of failure, not what was sent.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import orjson

audit_log = logging.getLogger("service.audit")


def audit(event: str, outcome: str, *, peer: str = "", tenant: str = "", method: str = "", **detail: Any) -> None:
    """Writes one audit line (at WARNING for refusals and failures, INFO otherwise)."""
    level = logging.INFO if outcome in ("ok", "allowed") else logging.WARNING
    if not audit_log.isEnabledFor(level):
        return
    fields = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "event": event,
        "peer": peer,
        "tenant": tenant,
        "method": method.lstrip("/"),
        "outcome": outcome,
        **{k: v for k, v in detail.items() if v not in (None, "")},
    }
    audit_log.log(level, orjson.dumps(fields).decode(), extra={"fields": fields})
