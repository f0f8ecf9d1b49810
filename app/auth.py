"""Optional API key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` on everything but the health probes.

A pure ASGI middleware rather than a route dependency, so that it also guards /docs, /openapi.json, /metrics and
unknown paths (no probing of what exists without the key).
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # orchestrator probes carry no secrets
# The browser page and its assets: a page load cannot carry the key (the page asks for it and sends it with each
# API call). They hold no data; the API behind them stays guarded.
PUBLIC_PAGE_PATHS = frozenset({"/"})
PUBLIC_PREFIXES = ("/static/",)


def presented_key(headers: Headers) -> str | None:
    """The key a request carries, if any (Bearer token first)."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


class ApiKeyMiddleware:
    """401 (JSON error shape) for requests without the configured key."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        public_paths: frozenset[str] = PUBLIC_PATHS | PUBLIC_PAGE_PATHS,
        public_prefixes: tuple[str, ...] = PUBLIC_PREFIXES,
    ) -> None:
        self.app = app
        self._key = api_key.encode()
        self.public_paths = public_paths
        self.public_prefixes = public_prefixes

    def public(self, path: str) -> bool:
        """Whether ``path`` is served without the key."""
        return path in self.public_paths or path.startswith(self.public_prefixes)

    def authorized(self, headers: Headers) -> bool:
        """Constant-time comparison, so response timing does not leak how much of a guess was right."""
        key = presented_key(headers)
        return key is not None and hmac.compare_digest(key.encode(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.public(scope["path"]) or self.authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
