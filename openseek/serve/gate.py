"""Who may talk to the server, and how every refusal reads.

The gate is a pure ASGI middleware in front of every route, so no routing quirk can skip it: it checks the Host
header (loopback only without a key), the API key (in constant time) and the body size before any route runs.
Every error the server sends, from the gate, a route, validation, a crash or a broken stream, is an `APIError`
rendered by `APIError.body(path)`: OpenAI's `{"error": {...}}` everywhere but under /v1/messages, where Anthropic's
clients read `{"type": "error", "error": {"type", "message"}}` (`anthropic_envelope`). The module needs no web
framework: the engine side (server.py, and so the terminal chat) raises `APIError` without importing one.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import re
from typing import Callable

PUBLIC_PATHS = {"/health"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}
ANTHROPIC_PATHS = "/v1/messages"  # and what lies under it (count_tokens)
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error"}


def error_envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body; the type follows from the HTTP status (anything unlisted is a server error)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def anthropic_envelope(status: int, message: str, param: str | None = None) -> dict:
    """Anthropic's error body. It has no `param`: the field at fault starts the message instead."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


class APIError(Exception):
    """An error the client caused or must retry; rendered as the OpenAI envelope with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def http_status(self, path: str = "") -> int:
        """Anthropic's API answers every invalid request with 400; OpenAI-compatible routes keep 422 for a body that
        fails validation."""
        return 400 if self.status == 422 and speaks_anthropic(path) else self.status

    def body(self, path: str = "") -> dict:
        """The envelope the API at `path` speaks."""
        if speaks_anthropic(path):
            return anthropic_envelope(self.http_status(path), self.message, self.param)
        return error_envelope(self.status, self.message, self.param, self.code)

    def renamed(self, renames: list[tuple[str, str]]) -> APIError:
        """This error with the fields it names (in `param` and in the message) spelt as another API spells them:
        `renames` holds (regex of a chat field, replacement), the first that matches `param` applies."""
        for pattern, replacement in renames:
            if self.param is not None and re.fullmatch(pattern, self.param):
                new = re.sub(pattern, replacement, self.param)
                return APIError(self.status, self.message.replace(self.param, new), new, self.code)
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> str | None:
    """Why we refuse to start, or None: a non-loopback address without a key would hand the model to anyone."""
    if is_loopback(host) or api_key:
        return None
    return (f"openseek serve: refusing to listen on {host} without an API key: anyone who can reach this "
            f"machine could use the model and read what it says. Pass --api-key KEY (or set OPENSEEK_API_KEY), "
            f"or keep the default --host 127.0.0.1.")


class Gate:
    """ASGI middleware: host, key and body size, checked before the app sees the request.

    - Without an API key the server is loopback-only: requests whose Host is not a loopback name are refused,
      which stops DNS-rebinding pages from talking to it through the browser.
    - With a key, every path but /health needs `Authorization: Bearer KEY`, `x-api-key: KEY` (what Anthropic's
      clients send) or HTTP Basic with the key as password (which lets a browser open the chat page), compared in
      constant time.
    - Bodies over the limit get 413, whether or not they declare a Content-Length.

    `count(route, status)` is told of every response, keyed by the matched route's template (never the raw
    path: clients must not grow the metrics).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, count: Callable[[str, int], None]):
        self.app, self.count = app, count
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guard(scope, receive, counted_send)
        finally:
            self.count(getattr(scope.get("route"), "path", "unmatched"), status)

    async def _guard(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key is None and not is_loopback(_host_name(headers.get("host", ""))):
            return await _send_error(send, scope["path"], APIError(
                400, "untrusted Host header: this server accepts only loopback names (start it with --api-key to "
                     "serve others)"))
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            challenge = {"www-authenticate": 'Basic realm="openseek"'} if scope["path"] == "/" else None
            error = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>` or "
                                  "`x-api-key: <key>`", code="invalid_api_key")
            return await _send_error(send, scope["path"], error, challenge)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _send_error(send, scope["path"], self._too_large())
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send, scope["path"], self._too_large())
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, which streaming responses watch for

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        if "x-api-key" in headers:
            return hmac.compare_digest(headers["x-api-key"].strip().encode(), self.key)
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.key)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than the limit of {self.max_body} bytes",
                        code="request_too_large")


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _send_error(send, path: str, error: APIError, headers: dict | None = None) -> None:
    """The error as a complete JSON response in the envelope `path` speaks, written straight to ASGI (the gate runs
    outside the app)."""
    body = json.dumps(error.body(path), ensure_ascii=False, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": error.http_status(path), "headers": head})
    await send({"type": "http.response.body", "body": body})
