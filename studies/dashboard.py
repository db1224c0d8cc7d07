"""optuna-dashboard on the service database: read-only unless asked, behind basic auth when asked or exposed.

optuna-dashboard can rename and delete studies, edit notes and tell trials, and has no authentication; on the
service database a DELETE wipes a job's trials. `dashboard_app` wraps its WSGI app: every request that is not
GET or HEAD is refused (405) unless writes are allowed, and with credentials every request needs them (401).
`check_exposure` refuses to serve anything but loopback without credentials.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["Credentials", "ReadOnly", "BasicAuth", "is_loopback", "check_exposure", "dashboard_app", "serve"]

READ_METHODS = frozenset({"GET", "HEAD"})
REALM = "s3search dashboard"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def __repr__(self) -> str:           # never the password in a log or a traceback
        return f"Credentials(user={self.user!r}, password=***)"


def _json(start_response: StartResponse, status: str, body: dict[str, Any],
          headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
    return [data]


class ReadOnly:
    """Refuse every request but GET and HEAD, anywhere in the app (the /api routes, and the schema migration
    that `POST /incompatible-rdb-schema` runs)."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in READ_METHODS:
            return self.app(environ, start_response)
        detail = (f"the dashboard is read-only: {method} is refused; start it with `s3search dashboard "
                  f"--allow-writes` to change studies")
        return _json(start_response, "405 Method Not Allowed", {"detail": detail}, [("Allow", "GET, HEAD")])


def _basic_credentials(header: str) -> Optional[tuple[bytes, bytes]]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if sep else None


class BasicAuth:
    """HTTP basic authentication with one user and password, compared in constant time."""

    def __init__(self, app: WSGIApplication, credentials: Credentials) -> None:
        self.app = app
        self._user = credentials.user.encode()
        self._password = credentials.password.encode()

    def _allowed(self, environ: WSGIEnvironment) -> bool:
        given = _basic_credentials(environ.get("HTTP_AUTHORIZATION", ""))
        if given is None:
            return False
        # Both compared, always: which one was wrong is not told by the time taken.
        user_ok = hmac.compare_digest(given[0], self._user)
        password_ok = hmac.compare_digest(given[1], self._password)
        return user_ok and password_ok

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._allowed(environ):
            return self.app(environ, start_response)
        return _json(start_response, "401 Unauthorized", {"detail": "the dashboard needs its user and password"},
                     [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')])


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine. A name other than localhost counts as
    exposed: it may resolve to anything."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, credentials: Optional[Credentials]) -> None:
    """Raise ValueError for a dashboard bound beyond loopback without credentials."""
    if credentials is None and not is_loopback(host):
        raise ValueError(f"--host {host} is reachable from other machines, and the dashboard would have no "
                         f"authentication: set S3S_DASHBOARD_PASSWORD (user S3S_DASHBOARD_USER, default "
                         f"s3search), or bind it to 127.0.0.1")


def dashboard_app(storage: Any, *, allow_writes: bool = False,
                  credentials: Optional[Credentials] = None) -> WSGIApplication:
    """optuna-dashboard's WSGI app on `storage`, read-only unless `allow_writes`, behind `credentials`."""
    from optuna_dashboard import wsgi

    app: WSGIApplication = wsgi(storage)
    if not allow_writes:
        app = ReadOnly(app)
    if credentials is not None:
        app = BasicAuth(app, credentials)      # outermost: without credentials, not even the 405 is told
    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # One thread per request: a slow client (or a slow study page) does not hold up everyone else.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(app: WSGIApplication, host: str, port: int) -> None:
    """Serve `app` until interrupted, with the standard library's WSGI server (as optuna-dashboard's own
    run_server does), one thread per request."""
    server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
    with make_server(host.strip("[]"), port, app, server_class=server_class, handler_class=_Handler) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
