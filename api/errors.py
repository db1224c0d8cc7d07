"""Error bodies: every validation error is a 422 naming its field, every other error a JSON `detail`; a body
that is not JSON is a 415 naming Content-Type."""

from __future__ import annotations

import email.message
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["field_errors", "validation_error", "error_response", "is_json_content_type", "install_error_handlers"]

log = logging.getLogger("s3search.api")
_SOURCES = {"body", "query", "path", "header", "cookie"}
# Union branches in pydantic locations ("nfe" -> "int" / "list[int]" / "NfeRange") are type tags, not fields.
_TYPE_TAGS = ("list[", "dict[", "NfeRange", "function-", "constrained-")
_EXACT_TAGS = {"int", "str", "float", "bool", "none", "list", "dict"}


def _field(loc: tuple[Any, ...], kind: str = "") -> str:
    parts = list(loc)
    if kind == "json_invalid":
        return "body"                      # the location is a character offset, not a field
    if parts and parts[-1] == "[key]":
        parts = parts[:-2]                 # a bad key of a mapping: name the mapping
    if parts and parts[0] in _SOURCES:
        source = parts.pop(0)
        if not parts:
            return source
    out: list[str] = []
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif out and (str(p) in _EXACT_TAGS or any(str(p).startswith(t) for t in _TYPE_TAGS)):
            continue
        else:
            out.append(("." if out else "") + str(p))
    return "".join(out) or "body"


def _message(e: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """pydantic's message, except for an unknown search option, whose message says what to do instead."""
    if e.get("type") == "extra_forbidden" and loc[:2] == ("body", "options") and len(loc) == 3:
        from s3search.search.options import option_rules

        rule = option_rules().get(str(loc[2]))
        if rule is not None and rule.server_only:
            return f"options.{loc[2]} is set by the server, not by a request"
        return f"options.{loc[2]} is not a search option; GET /v1/options lists them"
    if e.get("type") == "extra_forbidden" and loc[:3] == ("body", "options", "warm_start") and len(loc) == 4:
        from s3search.search.options import WarmStart

        if str(loc[3]) in WarmStart.__dataclass_fields__:
            return f"options.warm_start.{loc[3]} is set by the server, not by a request (name jobs or a predictor)"
    return str(e.get("msg", "invalid"))


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    items = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        item = {"field": _field(loc, str(e.get("type", ""))), "message": _message(e, loc),
                "loc": [p if isinstance(p, (int, str)) else str(p) for p in loc]}
        if (item["field"], item["message"]) not in seen:
            seen.add((item["field"], item["message"]))
            items.append(item)
    return items


def validation_error(items: list[dict[str, Any]], status: int = 422) -> JSONResponse:
    fields = ", ".join(dict.fromkeys(i["field"] for i in items))
    return JSONResponse({"detail": f"invalid request: {fields}", "errors": items}, status_code=status)


def error_response(status: int, detail: str, field: str, loc: list[str],
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    """The declared error body for a request refused on one part of it (a header, the whole body)."""
    return JSONResponse({"detail": detail, "errors": [{"field": field, "message": detail, "loc": loc}]},
                        status_code=status, headers=headers)


def is_json_content_type(value: Optional[str]) -> bool:
    """The test FastAPI applies before it parses a body as JSON: application/json or application/*+json."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _body_not_parsed(errors: list[dict[str, Any]]) -> bool:
    # FastAPI hands a body it did not parse as JSON (wrong or missing Content-Type) to the model as bytes, which
    # fails at loc ("body",); an absent body ("missing") is a plain 422.
    return any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in errors)


def content_type_error(value: Optional[str]) -> JSONResponse:
    got = f"got {value[:100]!r}" if value else "none was sent"
    return error_response(415, f"the body must be JSON sent with Content-Type: application/json ({got})",
                          "Content-Type", ["header", "content-type"], headers={"Accept-Post": "application/json"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        content_type = request.headers.get("content-type")
        if _body_not_parsed(errors) and not is_json_content_type(content_type):
            return content_type_error(content_type)
        return validation_error(field_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and str(exc.detail).startswith("There was an error parsing the body"):
            # FastAPI's answer to a body the JSON parser gave up on (e.g. nested too deep): a body error.
            return validation_error([{"field": "body", "message": "the body could not be parsed as JSON",
                                      "loc": ["body"]}])
        body = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error"}, status_code=500)
