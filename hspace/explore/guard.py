"""Who may talk to the explorer: Host names, origins and the access token (an ASGI middleware).

The explorer runs on a researcher's workstation and reads catalogs with that person's storage
credentials, so a web page in the same browser must not be able to use it:

- **DNS rebinding.** A page on ``evil.example`` whose name is re-pointed at 127.0.0.1 reaches the
  server as "same origin" but sends ``Host: evil.example:PORT``. Only the names the server is bound
  for are answered (127.0.0.1, localhost, [::1], the ``--host`` given and ``--allow-host`` names);
  any other Host gets 400.
- **Cross-site requests.** A ``text/plain`` POST from another origin is a "simple" request that a
  browser sends without asking first. API requests whose ``Origin`` is not the server's own, or
  whose fetch metadata (``Sec-Fetch-Site``) says another site or origin sent them, get 403; the
  app itself refuses JSON endpoints without an ``application/json`` body (415).
- **Other machines.** When the server listens on an address other than loopback, every request
  needs the per-launch token (``secrets.token_urlsafe``), compared with :func:`hmac.compare_digest`:
  given once as ``/?token=...`` (the printed URL, as notebook servers do), which sets an HttpOnly,
  SameSite=Strict cookie and redirects to ``/``; or as ``Authorization: Bearer <token>``.

Every response also says ``X-Frame-Options: DENY`` (no framing of the page by other sites),
``Referrer-Policy: no-referrer`` and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AccessPolicy", "RequestGuard", "is_loopback", "new_token", "parse_host"]

#: Names every explorer answers to: the loopback addresses and ``localhost``.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: Fetch-metadata values of requests the explorer's own page makes (or a person typing the URL).
SAME_ORIGIN_FETCH = ("same-origin", "none")
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def new_token() -> str:
    """A fresh access token (32 random bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for names and
    wildcard addresses such as 0.0.0.0 that other machines can reach."""
    name = _normal_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _normal_name(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def parse_host(value: str) -> tuple[str, int | None]:
    """(name, port or None) of a Host header or an ``--allow-host`` value: ``name``, ``name:port``,
    ``1.2.3.4:port``, ``[::1]:port``. ValueError when it is not one of those."""
    text = value.strip()
    if not text or any(c in text for c in "/?#@ \t*") or "://" in text:
        raise ValueError(f"{value!r} is not a host name or host:port")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end >= 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not a host name or host:port")
        name, port_text = text[1:end], (rest[1:] if rest else None)
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError(f"{value!r}: {name!r} in brackets is not an IPv6 address") from None
    elif text.count(":") == 1:
        name, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"{value!r}: an IPv6 address needs brackets, e.g. [::1]:8765")
    else:
        name = text
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"{value!r}: the port must be a number in 1..65535")
        port = int(port_text)
    name = _normal_name(name)
    if not name:
        raise ValueError(f"{value!r} has no host name")
    return name, port


@dataclass(frozen=True)
class AccessPolicy:
    """The Host names (with optional ports) a server answers, its port, and its token (or None).

    A name given without a port matches a Host header without a port or with the server's own
    port (any port while ``port`` is None); ``name:port`` matches that port only (a reverse proxy
    in front of the explorer, say).
    """

    hosts: frozenset[tuple[str, int | None]] = field(
        default_factory=lambda: frozenset((n, None) for n in LOOPBACK_NAMES)
    )
    port: int | None = None
    token: str | None = None

    @classmethod
    def for_server(
        cls, bind_host: str, port: int, allow_hosts: Iterable[str] = (), token: str | None = None
    ) -> AccessPolicy:
        """The policy of a server bound to ``bind_host:port``: loopback names, the bound host and
        ``allow_hosts`` (each ``name`` or ``name:port``; ValueError names a bad one)."""
        hosts = {(n, None) for n in LOOPBACK_NAMES} | {(_normal_name(bind_host), None)}
        for entry in allow_hosts:
            try:
                hosts.add(parse_host(entry))
            except ValueError as err:
                raise ValueError(f"--allow-host: {err}") from None
        return cls(frozenset(hosts), port, token)

    @property
    def cookie_name(self) -> str:
        """Per port: browsers share cookies across the ports of one host."""
        return f"hspace_explore_token_{self.port or 0}"

    def host_allowed(self, name: str, port: int | None) -> bool:
        if (name, port) in self.hosts:
            return True
        return (name, None) in self.hosts and (port is None or self.port is None or port == self.port)

    def token_matches(self, given: str | None) -> bool:
        if self.token is None:
            return True
        if not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token.encode())


def _origin_matches(origin: str, host: tuple[str, int | None]) -> bool:
    """True if ``origin`` (scheme://name[:port]) names the host the request was sent to."""
    try:
        parts = urlsplit(origin)
        scheme, name, port = parts.scheme, parts.hostname, parts.port
    except ValueError:
        return False
    if scheme not in _DEFAULT_PORTS or not name or parts.path or parts.query:
        return False
    default = _DEFAULT_PORTS[scheme]
    return (_normal_name(name), port or default) == (host[0], host[1] or default)


class RequestGuard:
    """ASGI middleware that answers only allowed Hosts, same-origin API requests and, when the
    policy has a token, requests that carry it (see the module doc)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # the explorer has none; never upgrade one
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope) -> Response | None:
        """The response that refuses this request, or None to let it through."""
        headers = Headers(scope=scope)
        host = self._host(headers)
        if isinstance(host, Response):
            return host
        api = scope["path"].startswith("/api/")
        return (self._cross_origin(headers, host) if api else None) or self._token(scope, headers, api)

    def _host(self, headers: Headers) -> tuple[str, int | None] | Response:
        raw_host = headers.get("host")
        if raw_host is None:
            return _error("a Host header is required", 400)
        try:
            host = parse_host(raw_host)
        except ValueError:
            return _error("the Host header is not a host name or host:port", 400)
        if not self.policy.host_allowed(*host):
            return _error(
                f"this server does not answer to host {host[0]!r}: open it as 127.0.0.1 or localhost, "
                "or start it with --allow-host NAME",
                400,
            )
        return host

    @staticmethod
    def _cross_origin(headers: Headers, host: tuple[str, int | None]) -> Response | None:
        site = headers.get("sec-fetch-site")
        if site is not None and site not in SAME_ORIGIN_FETCH:
            return _error(f"cross-origin request refused (Sec-Fetch-Site: {site})", 403)
        origin = headers.get("origin")
        if origin is not None and not _origin_matches(origin, host):
            return _error(f"cross-origin request refused (Origin: {origin})", 403)
        return None

    def _token(self, scope: Scope, headers: Headers, api: bool) -> Response | None:
        if self.policy.token is None:
            return None
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "token" in query:
                if not self.policy.token_matches(query["token"][-1]):
                    return PlainTextResponse("wrong token: open the URL hspace explore printed", 403)
                redirect = RedirectResponse("/", status_code=303)
                redirect.set_cookie(
                    self.policy.cookie_name, self.policy.token, httponly=True, samesite="strict", path="/"
                )
                return redirect
        given = _bearer(headers) or _cookie(headers, self.policy.cookie_name)
        if self.policy.token_matches(given):
            return None
        if given:
            return _error("wrong access token", 403)
        message = (
            "this explorer needs its access token: open the URL hspace explore printed (…/?token=…) "
            "or send Authorization: Bearer <token>"
        )
        response = _error(message, 401) if api else PlainTextResponse(message, 401)
        response.headers["www-authenticate"] = "Bearer"
        return response


def _error(message: str, status: int) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, credentials = value.partition(" ")
    return (credentials.strip() or None) if scheme.lower() == "bearer" else None


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value or None
    return None
