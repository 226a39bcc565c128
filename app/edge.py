"""The HTTP edge: size limits, API keys and a per-key concurrency cap, checked before the app.

:class:`EdgeGuard` is plain ASGI middleware: it sees a request's headers before anything reads
its body, and answers refusals itself in OpenAI's error shape. Per HTTP request, in order:

1. headers over ``max_header_bytes`` (names + values, summed) -> 431;
2. with API keys: every path but ``/health`` needs ``Authorization: Bearer <key>`` -> 401.
   Keys are compared as SHA-256 digests with ``hmac.compare_digest``, against every key (no
   early exit), so neither a key's content nor its length shows in the timing; no key, right
   or wrong, is ever written into a response or a log line;
3. a ``Content-Length`` over ``max_body_bytes`` -> 413 at once: not one body byte is read
   (the HTTP server stops reading the socket once its small buffer is full);
4. with API keys, more than ``max_concurrent_per_key`` requests of one key in flight -> 429
   with ``Retry-After`` (a streamed answer counts until its last byte);
5. a body without ``Content-Length`` (chunked) is read up to the limit: past it -> 413 and
   what was read is dropped; within it, it is replayed to the app unchanged;
6. a response body that cannot be sent for ``stall_timeout_s`` (the client stopped reading
   and every buffer on the way is full) marks the client stalled: the app is told the client
   disconnected (so the request is cancelled and its cache slot freed), what it still sends
   is dropped, and the HTTP server closes the connection.

It runs twice in a Serve deployment: in Ray Serve's HTTP proxy (limits only; see
:func:`proxy_middlewares`), so an oversized request never travels to the router replica, and
in front of the router's FastAPI app (all checks), which also covers a router run without
that proxy hook. (The proxy pulls a request's whole body into its queue for the replica as
fast as the client sends it, and the replica prefetches all of it; limits inside the app alone
would come too late.)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from app.errors import APIError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_STALL_TIMEOUT_S = 60.0
# The proxy process reads its limits from these (set by app.main before Ray starts).
ENV_MAX_BODY_BYTES = "RINGSERVE_MAX_BODY_BYTES"
ENV_MAX_HEADER_BYTES = "RINGSERVE_MAX_HEADER_BYTES"
ENV_STALL_TIMEOUT_S = "RINGSERVE_STREAM_STALL_TIMEOUT_S"  # "0": never
# Ray Serve calls the function named here in its HTTP proxy for extra ASGI middleware.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "app.edge:proxy_middlewares"
OPEN_PATHS = frozenset({"/health"})  # answered without an API key
PER_KEY_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class EdgeLimits:
    """What EdgeGuard enforces; no keys means no authentication and no per-key cap."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_concurrent_per_key: int | None = None
    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S  # None: never


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).digest()


class EdgeGuard:
    """ASGI middleware enforcing :class:`EdgeLimits`; see the module docstring."""

    def __init__(self, app: ASGIApp, limits: EdgeLimits | None = None,
                 on_refused: Callable[[str, int], None] | None = None) -> None:
        self.app = app
        self.limits = limits or EdgeLimits()
        self._digests = [_digest(k) for k in self.limits.api_keys]
        self._in_flight = [0] * len(self._digests)  # per key index
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or ())
        limits = self.limits
        header_bytes = sum(len(k) + len(v) for k, v in headers)
        if header_bytes > limits.max_header_bytes:
            await self._refuse(scope, send, APIError(
                431, f"request headers are {header_bytes} bytes; the limit is "
                f"{limits.max_header_bytes}", code="headers_too_large"))
            return
        key_index: int | None = None
        if self._digests and scope.get("path") not in OPEN_PATHS:
            key_index = self._authenticate(_header(headers, b"authorization"))
            if key_index is None:
                await self._refuse(scope, send, _unauthorized(headers))
                return
        length = _content_length(headers)
        if length is None and _header(headers, b"content-length") is not None:
            await self._refuse(scope, send, APIError(
                400, "Content-Length is not a number", code="invalid_content_length"))
            return
        if length is not None and length > limits.max_body_bytes:
            await self._refuse(scope, send, _too_large(limits.max_body_bytes))
            return
        cap = limits.max_concurrent_per_key
        if key_index is not None and cap is not None and self._in_flight[key_index] >= cap:
            await self._refuse(scope, send, APIError(
                429, f"this API key already has {cap} requests in flight, the most allowed; "
                "retry when one has finished", code="too_many_concurrent_requests",
                headers={"Retry-After": str(PER_KEY_RETRY_AFTER_S)}))
            return
        if key_index is not None:
            self._in_flight[key_index] += 1
        try:
            if length is None:
                replay = await self._read_bounded(receive)
                if replay is None:
                    await self._refuse(scope, send, _too_large(limits.max_body_bytes))
                    return
                receive = replay
            if limits.stall_timeout_s is not None:
                guard = StallGuard(receive, send, limits.stall_timeout_s)
                receive, send = guard.receive, guard.send
            await self.app(scope, receive, send)
        finally:
            if key_index is not None:
                self._in_flight[key_index] -= 1

    def _authenticate(self, header: bytes | None) -> int | None:
        """Index of the key the Authorization header carries, else None (constant time)."""
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        given = _digest(token.strip()) if scheme.lower() == "bearer" else b""
        matches = [hmac.compare_digest(given, d) for d in self._digests]  # all of them, always
        return matches.index(True) if any(matches) else None

    async def _read_bounded(self, receive: Receive) -> Receive | None:
        """Read a body of unknown length; None once it passes the limit."""
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect: let the app see it
                messages.append(message)
                break
            total += len(message.get("body", b""))
            if total > self.limits.max_body_bytes:
                return None
            messages.append(message)
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            return next(pending, None) or await receive()

        return replay

    async def _refuse(self, scope: Scope, send: Send, error: APIError) -> None:
        if self._on_refused is not None:
            self._on_refused(str(scope.get("path", "")), error.status)
        body = error.render()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class StallGuard:
    """Wraps one request's ``receive``/``send``: a body message that cannot be sent within
    ``timeout_s`` marks the client stalled; from then on ``receive`` says the client
    disconnected and ``send`` drops what it is given (the response stays incomplete, so the
    HTTP server closes the connection when the app returns)."""

    def __init__(self, receive: Receive, send: Send, timeout_s: float) -> None:
        self._receive = receive
        self._send = send
        self._timeout_s = timeout_s
        self.stalled = asyncio.Event()

    async def send(self, message: Message) -> None:
        if self.stalled.is_set():
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        try:
            await asyncio.wait_for(self._send(message), self._timeout_s)
        except asyncio.TimeoutError:
            logger.warning("client stalled: no response data accepted for %gs; closing "
                           "its connection and cancelling its request", self._timeout_s)
            self.stalled.set()

    async def receive(self) -> Message:
        if self.stalled.is_set():
            return {"type": "http.disconnect"}
        message = asyncio.ensure_future(self._receive())
        stalled = asyncio.ensure_future(self.stalled.wait())
        try:
            await asyncio.wait({message, stalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stalled.cancel()
            if not message.done():
                message.cancel()
        if message.done() and not message.cancelled():
            return message.result()
        return {"type": "http.disconnect"}


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    raw = _header(headers, b"content-length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is over the {limit}-byte limit",
                    code="request_too_large")


def _unauthorized(headers: Iterable[tuple[bytes, bytes]]) -> APIError:
    if _header(headers, b"authorization") is None:
        return APIError(401, "missing API key: send `Authorization: Bearer <key>`",
                        code="invalid_api_key")
    return APIError(401, "incorrect API key provided", code="invalid_api_key")


def limits_from_env() -> EdgeLimits:
    """The limits the proxy enforces: ``RINGSERVE_MAX_*_BYTES``, else the defaults."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else default

    stall = os.environ.get(ENV_STALL_TIMEOUT_S, "").strip()
    try:
        stall_s: float | None = float(stall) if stall else DEFAULT_STALL_TIMEOUT_S
    except ValueError:
        stall_s = DEFAULT_STALL_TIMEOUT_S
    return EdgeLimits(max_body_bytes=read(ENV_MAX_BODY_BYTES, DEFAULT_MAX_BODY_BYTES),
                      max_header_bytes=read(ENV_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_BYTES),
                      stall_timeout_s=stall_s if stall_s is not None and stall_s > 0 else None)


def proxy_middlewares() -> list[Any]:
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
    app.edge:proxy_middlewares``): the size limits, enforced before the proxy forwards."""
    from starlette.middleware import Middleware

    return [Middleware(EdgeGuard, limits=limits_from_env())]


def proxy_env(max_body_bytes: int, max_header_bytes: int,
              stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S) -> dict[str, str]:
    """Environment that makes Ray Serve's proxy enforce these limits (set before Ray starts);
    the stall timeout is written only where it is not the default."""
    env = {PROXY_CALLBACK_ENV: PROXY_CALLBACK, ENV_MAX_BODY_BYTES: str(max_body_bytes),
           ENV_MAX_HEADER_BYTES: str(max_header_bytes)}
    if stall_timeout_s != DEFAULT_STALL_TIMEOUT_S:
        env[ENV_STALL_TIMEOUT_S] = "0" if stall_timeout_s is None else f"{stall_timeout_s:g}"
    return env
