"""Calling an AsyncAPI's webhook without letting a tenant reach the server's network.

The URL comes from a tenant's kiln.yaml, so the server must not become a way to
POST into its own loopback, link-local (cloud metadata at 169.254.169.254) or
private networks. The host is resolved once, EVERY address it resolves to is
checked (a name that answers one public and one private address is refused), and
the connection goes to the checked address itself, never to a second lookup, so
DNS rebinding between the check and the connect cannot redirect it. TLS still
verifies the certificate against the URL's host name (SNI). Redirects are not
followed (a 3xx is a failed delivery). The operator allows internal targets with
`--webhook-allow CIDR` (server.yaml `webhook_allow`).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TIMEOUT_S = 10.0


class WebhookRefused(Exception):
    """The target is not one this server may call; the message says why and what to do."""


class WebhookFailed(Exception):
    """The target was called and did not answer 2xx (or could not be reached)."""


def parse_allow(values: Sequence[str]) -> list[IPNetwork]:
    """`--webhook-allow` values as networks; ValueError names the bad one."""
    nets: list[IPNetwork] = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"--webhook-allow {value!r} is not an address or CIDR block; "
                f"write e.g. 127.0.0.1/32 or 10.0.0.0/8"
            ) from None
    return nets


def _unmapped(ip: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d is the IPv4 address a.b.c.d (checked and allowed as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _internal(ip: IPAddress) -> bool:
    return (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    )


def resolve(url: str, allow: Sequence[IPNetwork]) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) for `url`, or WebhookRefused."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookRefused(f"webhook {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookRefused(f"webhook host {host!r} resolves to no address")
    for address in addresses:
        ip = _unmapped(ipaddress.ip_address(address.split("%", 1)[0]))
        if _internal(ip) and not any(ip in net for net in allow if ip.version == net.version):
            raise WebhookRefused(
                f"webhook {host!r} resolves to {address}, a loopback, link-local or private "
                f"address; the server refuses those unless its operator allows them with "
                f"--webhook-allow CIDR (e.g. --webhook-allow {ip}/"
                f"{32 if ip.version == 4 else 128})"
            )
    return parts.scheme, host, port, addresses[0]


class _Pinned(http.client.HTTPConnection):
    """HTTP to an address already checked, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is still checked against the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address
        self._tls = ssl.create_default_context()

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def post_json(url: str, body: bytes, allow: Sequence[IPNetwork], timeout: float = TIMEOUT_S) -> int:
    """POST `body` (JSON) to `url` once; its status, or WebhookRefused / WebhookFailed.

    Blocking: the server calls it through `asyncio.to_thread`.
    """
    scheme, host, port, address = resolve(url, allow)
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = _PinnedTLS if scheme == "https" else _Pinned
    conn = cls(host, port, address, timeout)
    try:
        conn.request(
            "POST",
            target,
            body=body,
            headers={"Content-Type": "application/json", "User-Agent": "kiln-webhook"},
        )
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise WebhookFailed(f"webhook {host}:{port} could not be called: {exc}") from None
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise WebhookFailed(f"webhook {host}:{port} answered {status}")
    return status
