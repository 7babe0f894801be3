"""Which proxy a request to an upstream goes through: the one rule for the hot path and the probes.

The rule is httpx's (0.28, ``trust_env=True``), so the HTTP/1.1 pool and the Modal status probe,
which uses httpx, always agree on how an upstream is reached:

* The variables come from :func:`urllib.request.getproxies` (``HTTP_PROXY``, ``HTTPS_PROXY``,
  ``ALL_PROXY``, ``NO_PROXY``; the lowercase spelling wins when both are set; empty means unset).
  A proxy value without a scheme means ``http://``.
* ``NO_PROXY`` is a comma list: ``*`` anywhere turns every proxy off; an IP address or
  ``localhost`` matches that host only; ``example.com`` matches it and its subdomains;
  ``.example.com`` its subdomains only (unlike :func:`urllib.request.proxy_bypass`, which also
  matches ``example.com`` itself: httpx is the reference here); ``host:port`` and
  ``scheme://host`` narrow an entry to a port or a scheme. CIDR ranges are not understood
  (httpx compares the address before the ``/``).
* The most specific entry wins: one with a port first, then the longest host, then the longest
  scheme (``https://`` before ``all://``).

Proxies may be ``http://`` or ``https://`` (TLS to the proxy) with credentials in the URL, sent as
``Proxy-Authorization: Basic``. SOCKS proxies are refused with a message, as httpx does without
its ``socks`` extra.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def authority(host: str, port: int, scheme: str) -> str:
    """``host[:port]`` as written in a ``Host`` header or a CONNECT target: IPv6 literals in
    brackets, the port left out when it is the scheme's default."""
    name = f"[{host}]" if ":" in host else host
    return name if _DEFAULT_PORTS.get(scheme) == port else f"{name}:{port}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy: where to connect and what to tell it.

    Attributes:
        scheme: ``http`` or ``https`` (TLS to the proxy itself).
        host: Proxy host (IPv6 without brackets).
        port: Proxy port.
        authorization: ``Proxy-Authorization`` value from the URL's credentials, or None.
        url: The proxy URL without credentials, for logs and errors.
    """

    scheme: str
    host: str
    port: int
    authorization: str | None
    url: str


def parse_proxy(url: str) -> Proxy:
    """Parses a proxy URL (``http://user:pass@host:port``); raises ValueError for other schemes."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = parts.scheme.lower()
    if scheme in ("socks5", "socks5h"):
        raise ValueError(f"SOCKS proxies are not supported (got {_redact(url)}); use an http:// proxy")
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) proxy URL: {_redact(url)}")
    port = parts.port or _DEFAULT_PORTS[scheme]
    authorization = None
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return Proxy(scheme, parts.hostname, port, authorization, f"{scheme}://{authority(parts.hostname, port, '')}")


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


@dataclass(frozen=True, slots=True)
class _Pattern:
    scheme: str  # "" matches any
    host: re.Pattern[str] | None  # None matches any
    port: int | None
    proxy: str | None  # None: go direct
    priority: tuple[int, int, int]


def _pattern(key: str, proxy: str | None) -> _Pattern:
    scheme, _, rest = key.partition("://")
    scheme = "" if scheme == "all" else scheme.lower()
    hostport = rest.split("/", 1)[0]
    host, port = hostport, None
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else None
    elif hostport.count(":") == 1:
        host, _, tail = hostport.partition(":")
        port = int(tail) if tail.isdigit() else None
    host = host.lower()
    if port is not None and _DEFAULT_PORTS.get(scheme) == port:
        port = None  # httpx normalises a scheme's default port away, in patterns and in URLs alike
    regex: re.Pattern[str] | None
    if not host or host == "*":
        host, regex = "", None
    elif host.startswith("*."):
        regex = re.compile(rf"^.+\.{re.escape(host[2:])}$")
    elif host.startswith("*"):
        regex = re.compile(rf"^(.+\.)?{re.escape(host[1:])}$")
    else:
        regex = re.compile(rf"^{re.escape(host)}$")
    return _Pattern(scheme, regex, port, proxy, (0 if port is not None else 1, -len(host), -len(scheme)))


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text.split("/")[0]).version == version
    except ValueError:
        return False


def _patterns(proxies: Mapping[str, str]) -> list[_Pattern]:
    found: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if proxies.get(scheme):
            value = proxies[scheme]
            found[f"{scheme}://"] = value if "://" in value else f"http://{value}"
    for entry in (e.strip() for e in proxies.get("no", "").split(",")):
        if entry == "*":
            return []
        if not entry:
            continue
        if "://" in entry:
            found[entry] = None
        elif _is_ip(entry, 4) or entry.lower() == "localhost":
            found[f"all://{entry.split('/')[0]}"] = None
        elif _is_ip(entry, 6):
            found[f"all://[{entry.split('/')[0]}]"] = None
        else:
            found[f"all://*{entry}"] = None
    # sorted() is stable: equal priorities keep httpx's insertion order.
    return sorted((_pattern(k, v) for k, v in found.items()), key=lambda p: p.priority)


def proxy_url_for(url: str, proxies: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL (credentials included) httpx would use for ``url``, or None for a direct
    connection. ``proxies`` defaults to :func:`urllib.request.getproxies` (the environment)."""
    target = urlsplit(url)
    scheme = target.scheme.lower()
    host = (target.hostname or "").lower()
    port = target.port if target.port != _DEFAULT_PORTS.get(scheme) else None
    for pattern in _patterns(urllib.request.getproxies() if proxies is None else proxies):
        if pattern.scheme and pattern.scheme != scheme:
            continue
        if pattern.host is not None and not pattern.host.match(host):
            continue
        if pattern.port is not None and pattern.port != port:
            continue
        return pattern.proxy
    return None


def proxy_for(url: str, proxies: Mapping[str, str] | None = None) -> Proxy | None:
    """The parsed proxy for ``url`` under :func:`proxy_url_for`'s rule; ValueError for a proxy
    URL this client cannot use."""
    chosen = proxy_url_for(url, proxies)
    return None if chosen is None else parse_proxy(chosen)
