"""Limits a guard service enforces at the HTTP layer, whatever the FastAPI version or HTTP parser.

* :class:`BodyLimit`: pure ASGI middleware that counts the bytes of a request body as they
  arrive (and refuses a declared ``Content-Length`` above the limit before reading any), answering
  413 in OpenAI's error shape; it also gives the whole body ``timeout_s`` to arrive (408), so a
  client that stops short of its Content-Length does not hold a connection. FastAPI only gained a
  ``max_body_size`` argument in 0.165 (older versions keep it in ``app.extra`` and read bodies of
  any size), so the limit does not depend on it.
* :func:`protocol_with_header_timeout`: uvicorn's HTTP protocol (h11 or httptools) with a deadline
  for a request's headers, counted from the connection's start or the previous response: uvicorn
  has none (its keep-alive timer stops at the first byte), so headers sent one byte at a time
  would hold a connection for ever.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape (what its clients parse): ``{"error": {"message", "type", "param", "code"}}``."""
    kind = (
        "invalid_request_error"
        if status < 500
        else "service_unavailable"
        if status == 503
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_error(send: Send, status: int, message: str, code: str, close: bool = True) -> None:
    """An error response written straight to ASGI (outside the framework), closing the connection."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    """Raised into the app's body read; the middleware answers instead of the app."""


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, 408 for one slower than ``timeout_s``."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = (413, f"request body above the {self.max_bytes}-byte limit", "body_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await send_error(send, *too_large)  # refused before a byte of it is read
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, body_done, started = 0, False, False
        refusal: tuple[int, str, str] | None = None

        async def limited() -> dict[str, Any]:
            nonlocal received, body_done, refusal
            if body_done:  # later reads wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                refusal = (
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    "body_timeout",
                )
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = too_large
                    raise _Refused
                body_done = not message.get("more_body", False)
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            if refusal is not None:
                return  # whatever the app answers to the failed read, the refusal replaces it
            started = True
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await send_error(send, *refusal)


HTTP_PARSERS = ("auto", "h11", "httptools")


def protocol_with_header_timeout(http: str, timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's protocol for ``http`` (auto: httptools if installed, else h11) that closes a
    connection whose next request's headers are not complete ``timeout_s`` after it opened or after
    its previous response (uvicorn's keep-alive timer covers an idle connection, not a slow one)."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base: Any = import_from_string(HTTP_PROTOCOLS[http])

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle: Any) -> None:
            # the same cycle as when armed: no request's headers were completed since
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline
