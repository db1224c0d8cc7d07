"""The FastAPI application factory."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studies.db import make_engine, make_session_factory
from studies.job_reader import JobReader
from studies.migrate import upgrade

from .deps import KeyCache
from .docs import install_docs
from .errors import error_response, install_error_handlers
from .routes import catalog, health, jobs
from .settings import Settings

__all__ = ["create_app", "RequestLimits", "http_protocol", "head_limit"]

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:            # uvicorn without httptools runs h11, which enforces the head limit itself
    HttpToolsProtocol = None


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    if settings.model_registry:
        # The model registry reads its file from the environment; the runner does the same.
        os.environ["S3SEARCH_MODEL_REGISTRY"] = settings.model_registry
    engine = make_engine(settings.database_url)
    if settings.migrate_on_start:
        upgrade(engine)
    reader = JobReader(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await reader.aclose()

    # No `max_body_size`: its 413 is plain text. RequestLimits enforces the same limit with the JSON error body.
    # /docs and /redoc come from install_docs, with their scripts served here rather than from a CDN.
    app = FastAPI(title="s3search", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search few-step diffusion solver schedules (S³) as jobs; read trials and schedules.")
    app.add_middleware(RequestLimits, max_header_bytes=settings.max_header_bytes,
                       max_body_bytes=settings.max_request_bytes)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.job_reader = reader
    app.state.optuna_storage = None
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    _warm_up()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.build_router(settings))
    app.include_router(catalog.router)
    install_docs(app)
    return app


def header_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """The size of the header lines as sent: `name: value` and CRLF each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def _content_length(headers: list[tuple[bytes, bytes]]) -> Optional[int]:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None         # the server refuses a malformed one before the app sees it
    return None


def _body_too_large(limit: int, what: str) -> dict[str, Any]:
    detail = f"the request body ({what}) is over the limit of {limit} bytes (S3S_MAX_REQUEST_BYTES)"
    return {"detail": detail, "errors": [{"field": "body", "message": detail, "loc": ["body"]}]}


class RequestLimits:
    """Refuse a request whose headers (431) or body (413) are over the limits, with the declared error body.

    A declared Content-Length over the limit is answered before any of the body is read; a body without one
    (chunked) is counted as the route reads it, and the 413 is raised from `receive` so that the app's
    HTTPException handler writes it. Both answers close the connection: the unread rest of the body is not
    waited for."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope["headers"])
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._counted(receive), send)

    def _refusal(self, headers: list[tuple[bytes, bytes]]) -> Optional[JSONResponse]:
        size = header_bytes(headers)
        if size > self.max_header_bytes:
            name, value = max(headers, key=lambda h: len(h[0]) + len(h[1]))
            field = name.decode("latin-1")[:100]
            return error_response(431, f"the request headers are {size} bytes, over the limit of "
                                       f"{self.max_header_bytes} (S3S_MAX_HEADER_BYTES); the largest is {field} "
                                       f"({len(value)} bytes)", field, ["header", field],
                                  headers={"Connection": "close"})
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body_bytes:
            body = _body_too_large(self.max_body_bytes, f"Content-Length {declared}")
            return JSONResponse(body, status_code=413, headers={"Connection": "close"})
        return None

    def _counted(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        total = 0

        async def counted() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise HTTPException(413, detail=_body_too_large(limit, f"at least {total} bytes"),
                                        headers={"Connection": "close"})
            return message

        return counted


def head_limit(max_header_bytes: int) -> int:
    """The bound on a request's whole head (request line and headers) where the server cuts the connection.

    Above the header limit by an allowance for the request line, which RequestLimits does not count: a head
    between the two gets RequestLimits' 431 naming the header."""
    return max_header_bytes + 8 * 1024


def http_protocol() -> Union[type, str]:
    """The uvicorn `http` protocol for `s3search serve`: httptools with a head limit, else h11 (whose
    h11_max_incomplete_event_size is the limit)."""
    return "h11" if HttpToolsProtocol is None else HeadLimitedHttpTools


if HttpToolsProtocol is not None:
    class HeadLimitedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol with a bound on the request head.

        httptools has no limit and gathers a header line whole before uvicorn sees it (a 32 MiB header took
        2 s and as much memory); this one answers 431 and closes once an unfinished head passes the bound.
        The bound is uvicorn's h11_max_incomplete_event_size, so one setting bounds both protocols."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True        # between requests, every byte read is head until the headers end
            self._head_bytes = 0

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            limit = self.config.h11_max_incomplete_event_size
            if self._in_head and limit is not None and self._head_bytes > limit and not self.transport.is_closing():
                self._refuse_head(limit)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            super().on_message_complete()

        def _refuse_head(self, limit: int) -> None:
            detail = f"the request head is over {limit} bytes (S3S_MAX_HEADER_BYTES)"
            body = json.dumps({"detail": detail, "errors": [{"field": "headers", "message": detail,
                                                             "loc": ["header"]}]}).encode()
            self.logger.warning("request head over %d bytes, connection closed", limit)
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\nconnection: close\r\ncontent-length: " + str(len(body)).encode()
                                 + b"\r\n\r\n" + body)
            self.transport.close()


def _warm_up() -> None:
    """Import what a submission validates against now, not on the first request: with several workers, each
    worker's first submission would otherwise wait seconds for torch and the search package to import."""
    from . import catalog
    from .routes.jobs import config_of  # noqa: F401

    catalog.model_names(), catalog.metric_names(), catalog.predictor_names(), catalog.baseline_names()
    try:
        import s3search.search.run  # noqa: F401
    except ImportError:
        pass


def app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory api.app:app_from_env`."""
    return create_app(Settings())
