"""
What `scripts/chat_web.py` checks about a connection and a request before any of it reaches the model (issue 24):

- `deadline_protocol(header_timeout, body_timeout)`: uvicorn's HTTP/1.1 protocol with two deadlines, so that
  half-open and slow ("slowloris") connections cannot pile up: a request's line and headers must arrive within
  header_timeout seconds of its first byte (or of the connection), its body within body_timeout seconds of the
  headers; past either the connection is closed. Idle keep-alive connections are uvicorn's own timeout.
- `read_body(request, max_bytes)`: the body read while it streams in, refused (413) as soon as it passes the
  limit, chunked transfer encoding included (Content-Length alone is not a bound: a chunked body has none).
- `json_nesting_depth(raw)`: how deep arrays and objects nest, counted without parsing, so that a 100,000-deep
  body is a 400 and not a RecursionError.
- `check_content_type(headers)`: POST bodies must be `application/json` (415 otherwise): a cross-origin page can
  send `text/plain` without a CORS preflight, never `application/json`.
- `host_allowed(host, allowed)` / `check_host_and_origin(headers, allowed)` / `HostOriginGuard` (ASGI middleware,
  so every path is covered, the chat page included): the `Host` header (DNS rebinding) and
  the `Origin` header (cross-site requests from a browser) must name an allowed host. By default a server on a
  loopback address allows only loopback names; `--allowed_hosts` widens it ("*": any).

Every check raises nanochat.web.APIError (status + OpenAI's error body). Tests: tests/test_chat_web.py.
"""

import ipaddress
import json
import re
from urllib.parse import urlsplit

from nanochat.web import APIError

MAX_JSON_DEPTH = 32  # a chat request nests 4 deep (body, messages, message, content parts)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind_host):
    """Host names a server bound to `bind_host` answers to when --allowed_hosts is not given: on a loopback
    address, the loopback names only (a DNS-rebinding page cannot use them); elsewhere any ("*"), since the
    server was asked to face the network (its API key is then what protects it)."""
    try:
        loopback = ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = bind_host == "localhost"
    return list(LOOPBACK_NAMES) if loopback else ["*"]


def _host_name(value):
    """'example.com:8000' / '[::1]:8000' / 'http://x:1' -> 'example.com' / '::1' / 'x' (lower case)."""
    if "//" not in value:
        value = "//" + value
    try:
        return (urlsplit(value).hostname or "").lower()
    except ValueError:
        return ""


def host_allowed(host, allowed):
    """Whether a Host or Origin value names one of `allowed` (host names; "*" allows any)."""
    return "*" in allowed or (host is not None and _host_name(host) in [a.lower() for a in allowed])


def check_host_and_origin(headers, allowed):
    """403 for a request whose Host, or Origin when it has one, is not an allowed host."""
    host = headers.get("host")
    if not host_allowed(host, allowed):
        raise APIError(403, f"Host {host!r} is not served here (allowed: {', '.join(allowed)}; widen with "
                            "--allowed_hosts)", None, "host_not_allowed")
    origin = headers.get("origin")
    if origin is not None and origin != "null" and not host_allowed(origin, allowed):
        raise APIError(403, f"requests from the origin {origin!r} are not accepted (allowed hosts: "
                            f"{', '.join(allowed)}; widen with --allowed_hosts)", None, "origin_not_allowed")
    if origin == "null" and "*" not in allowed:  # sandboxed iframes and file:// pages
        raise APIError(403, "requests from an opaque origin ('null') are not accepted", None, "origin_not_allowed")


def check_content_type(headers):
    """415 unless the body is declared as JSON (`application/json`, any parameters)."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got "
                            f"{media_type or 'none'!r})", None, "unsupported_media_type")


class HostOriginGuard:
    """ASGI middleware: every HTTP request passes check_host_and_origin(allowed) or gets its 403 (JSON error)."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                check_host_and_origin(headers, self.allowed)
            except APIError as e:
                body = json.dumps(e.body()).encode()
                await send({"type": "http.response.start", "status": e.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def read_body(request, max_bytes):
    """The request body, read chunk by chunk and refused (413) as soon as it exceeds max_bytes; a client that
    goes away (or is cut off by the body deadline) midway is a 408, not a traceback."""
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the request body is over {max_bytes} bytes", None, "body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(408, "the request body did not arrive in full", None, "request_timeout") from None
    return b"".join(chunks)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets: deleted below


def json_nesting_depth(raw):
    """The deepest nesting of arrays/objects in a JSON text (bytes), brackets inside strings not counted.
    Invalid JSON gives some number; the parser reports it afterwards."""
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw).translate(None, _BRACKETS):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def deadline_protocol(header_timeout, body_timeout):
    """A subclass of uvicorn's h11 protocol (pass it as uvicorn.run(..., http=...)) that closes a connection whose
    request headers take longer than header_timeout seconds, or whose body takes longer than body_timeout
    seconds after the headers. Generation time is not bounded here (the request is complete by then)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline, self._phase = None, None
            self._watch()

        def data_received(self, data):
            super().data_received(data)
            self._watch()

        def handle_events(self):
            super().handle_events()
            self._watch()

        def connection_lost(self, exc):
            self._cancel()
            super().connection_lost(exc)

        def _cancel(self):
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _watch(self):
            """Arm the deadline of the phase the client is in (headers, body), once per phase."""
            state = self.conn.their_state
            phase = {h11.IDLE: "headers", h11.SEND_BODY: "body"}.get(state)
            if phase == self._phase:
                return
            self._cancel()
            if phase is not None and not self.transport.is_closing():
                seconds = header_timeout if phase == "headers" else body_timeout
                self._deadline = self.loop.call_later(seconds, self._expire, phase)
                self._phase = phase

        def _expire(self, phase):
            self._deadline = None
            if self._phase != phase or self.transport.is_closing():
                return
            self.logger.info("closing a connection from %s: its request %s took longer than %ss", self.client,
                             phase, header_timeout if phase == "headers" else body_timeout)
            if self.cycle is not None and not self.cycle.response_complete:  # the app sees a disconnect
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return DeadlineH11Protocol
