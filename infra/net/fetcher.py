"""The one way this server follows a URL a client gave it: image inputs (`infra.net.inputs`), model
downloads (`infra.catalog.loader`) and webhook POSTs (`infra.jobs.webhooks`).

Guards against server-side request forgery (a client making the server reach its own network):

- only http and https;
- the host is resolved once per hop (`socket.getaddrinfo`) and the connection is pinned to that
  address: the request goes to the IP with the original `Host` header and, for https, the original
  name as TLS SNI (so the certificate is still verified against the name). A DNS answer that
  changes between the check and the connection (DNS rebinding) cannot redirect it;
- addresses that are not public are refused with a `BadInput` (`Blocked`): loopback, private
  (RFC 1918, fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10),
  multicast, unspecified, reserved, shared/CGNAT 100.64/10, and the IPv4-mapped (::ffff:a.b.c.d)
  and NAT64 forms of those — unless the host, or host:port, is in the `fetch_allowlist` setting;
- redirects are followed here, one hop at a time (at most `max_redirects`), each hop checked again;
- proxies from the environment are ignored (a proxy would connect somewhere else than checked);
- `iter_capped` reads a body with a size cap: a `Content-Length` over the cap is refused before
  anything is read, and the stream is cut when it passes the cap.

Transport failures stay `httpx` exceptions (`httpx.TimeoutException`, `httpx.ConnectError`,
`httpx.TooManyRedirects`...), so callers keep their own messages for them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from models.errors import BadInput

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


class Blocked(BadInput):
    """The URL is not one this server fetches (scheme, or a host that resolves to a non-public
    address). The message says why; it is meant for the client as is."""


class PrivateAddress(Blocked):
    """The host resolves to an address that is not public (and is not allowlisted)."""


class TooLarge(Exception):
    """The body is larger than the caller's cap. `declared` is the Content-Length when that is
    what gave it away (nothing was read), else None (the stream passed the cap)."""

    def __init__(self, limit: int, declared: int | None = None):
        super().__init__(f"the body is larger than {limit} bytes")
        self.limit = limit
        self.declared = declared


# --------------------------------------------------------------------------- addresses


def non_public_reason(ip: str) -> str | None:
    """Why `ip` is not a public address ('loopback', 'private'...), or None when it is public."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
            address = address.ipv4_mapped
        elif address in _NAT64:  # 64:ff9b::a.b.c.d reaches a.b.c.d through a NAT64 gateway
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (CGNAT)"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def is_allowed(host: str, port: int, allowlist: list[str] | tuple[str, ...]) -> bool:
    """Whether `host` (or `host:port`) is in the allowlist (case-insensitive; IPv6 hosts may be
    written with or without brackets, with a port only in brackets: `[::1]:8080`)."""
    host = host.lower()
    bracketed = f"[{host}]" if ":" in host else host
    names = {host, bracketed, f"{bracketed}:{port}"}
    return any(entry.strip().lower() in names for entry in allowlist)


def resolve(host: str, port: int, allowlist: list[str] | tuple[str, ...] = ()) -> str:
    """The one address to connect to for `host`: its first DNS answer, checked to be public unless
    the host is allowlisted. Raises `PrivateAddress` (a `Blocked`), or `httpx.ConnectError` when
    it does not resolve (no timeout of its own: the system resolver's applies)."""
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpx.ConnectError(f"{host} does not resolve: {exc}") from None
    if not answers:
        raise httpx.ConnectError(f"{host} does not resolve")
    ip = answers[0][4][0]
    if is_allowed(host, port, allowlist):
        return ip
    reason = non_public_reason(ip)
    if reason is not None:
        kind = "a private" if reason == "private" else f"a private ({reason})"
        raise PrivateAddress(
            f"{host} resolves to {kind} address ({ip}); this server only fetches public URLs",
            tip="Use a publicly reachable URL.",
        )
    return ip


# --------------------------------------------------------------------------- requests


@contextmanager
def stream(
    method: str,
    url: str,
    *,
    allowlist: list[str] | tuple[str, ...] = (),
    timeout: float | httpx.Timeout = 20.0,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    follow_redirects: bool = True,
    max_redirects: int = MAX_REDIRECTS,
) -> Iterator[httpx.Response]:
    """Send `method url` (pinned to its checked address) and yield the streamed response.

    With `follow_redirects`, 301/302/303/307/308 answers are followed up to `max_redirects` hops
    (then `httpx.TooManyRedirects`); 303, and 301/302 to a POST, continue as a GET without a body,
    as browsers do. Without it, a redirect answer is yielded as is. `response.url` is the pinned
    (IP) URL of the last hop; its path is the one requested.

    Raises `Blocked` (a `BadInput`) for a refused URL, `httpx.InvalidURL` for one that does not
    parse, else the `httpx` transport errors.
    """
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        current = _parse(url)
        for hop in range(max_redirects + 1):
            request = _pinned_request(client, method, current, allowlist, headers, content)
            response = client.send(request, stream=True)
            location = response.headers.get("location")
            if not follow_redirects or response.status_code not in _REDIRECTS or not location:
                try:
                    yield response
                finally:
                    response.close()
                return
            response.close()
            if hop == max_redirects:
                raise httpx.TooManyRedirects(f"more than {max_redirects} redirects", request=request)
            try:
                current = _parse(str(current.join(location)))
            except httpx.InvalidURL:
                raise httpx.RemoteProtocolError(f"bad redirect Location {location!r}", request=request) from None
            if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                method, content = ("HEAD" if method == "HEAD" else "GET"), None


def iter_capped(response: httpx.Response, limit: int, chunk_size: int | None = None) -> Iterator[bytes]:
    """The body of a streamed response in chunks, at most `limit` bytes: raises `TooLarge` before
    reading when Content-Length says more, or as soon as the stream passes the limit."""
    check_length(response, limit)
    size = 0
    for chunk in response.iter_bytes(chunk_size):
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        yield chunk


def check_length(response: httpx.Response, limit: int) -> None:
    """Raise `TooLarge` when the response's Content-Length is over `limit` (reads nothing)."""
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit, int(declared))


def check_url(url: str, field: str, allowlist: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse, before any work is queued, a URL the server will connect to later (a webhook, an S3
    endpoint): a `BadInput` naming `field` unless it is http(s) and its host resolves to a public
    (or allowlisted) address. The connection itself is checked again when it is made."""
    try:
        parsed = _parse(url)
        resolve(parsed.host, parsed.port or _DEFAULT_PORTS[parsed.scheme], allowlist)
    except Blocked as exc:
        raise BadInput(f"{field}: {exc.message}", tip="Use a publicly reachable http(s) URL.") from None
    except httpx.InvalidURL as exc:
        raise BadInput(f"{field}: {url!r} is not a valid URL ({exc})", tip="Send an absolute http(s) URL.") from None
    except httpx.ConnectError as exc:
        raise BadInput(f"{field}: {exc}", tip="Check the host name.") from None


def _parse(url: str) -> httpx.URL:
    """An absolute http(s) URL with a host, or `Blocked` / `httpx.InvalidURL`."""
    parsed = httpx.URL(url)  # raises httpx.InvalidURL
    if parsed.scheme not in _DEFAULT_PORTS:
        shown = parsed.scheme or "a relative URL"
        raise Blocked(f"{url} is not an http(s) URL ({shown}); this server only fetches http and https URLs")
    if not parsed.host:
        raise httpx.InvalidURL(f"{url} has no host")
    return parsed


def _pinned_request(
    client: httpx.Client,
    method: str,
    url: httpx.URL,
    allowlist: list[str] | tuple[str, ...],
    headers: dict[str, str] | None,
    content: bytes | None,
) -> httpx.Request:
    """The request for `url`, sent to the address its host resolves to (checked), with the
    original Host header and TLS server name."""
    host = url.raw_host.decode("ascii")  # IDNA-encoded, no IPv6 brackets
    ip = resolve(host, url.port or _DEFAULT_PORTS[url.scheme], allowlist)
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    request_headers = dict(headers or {})
    request_headers["Host"] = url.netloc.decode("ascii")
    return client.build_request(
        method, url.copy_with(host=ip), headers=request_headers, content=content, extensions=extensions
    )
