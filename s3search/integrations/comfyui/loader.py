"""Where the node's schedule comes from: a JSON file, or a job's `/schedule` URL on the s3search service.

Only JSON is read (never pickles). A document is a native schedule (solver or named, as `GET
/v1/jobs/{id}/schedule` returns by default) or an export document (`?format=comfyui` and the other formats,
and `s3search export`), whose `schedule` field holds the native one and whose `data_mean`, where present, is
the model's data mean that first_step="mean-x0" needs.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from s3search.exports import load_schedule

__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "MAX_BYTES", "Loaded", "ScheduleSourceError", "is_url", "load_source",
           "read_source", "read_schedule_file", "fetch_schedule", "schedule_from_document"]

# The service's key header (api/deps.py); this module must not import the service, which ComfyUI lacks.
API_KEY_HEADER = "X-API-Key"
# A key typed into the node is saved with the workflow (and into every PNG ComfyUI writes): this avoids that.
API_KEY_ENV = "S3S_API_KEY"
# A schedule document is a few kilobytes; this bound only stops a wrong URL from filling memory.
MAX_BYTES = 8 * 1024 * 1024


class ScheduleSourceError(ValueError):
    """The schedule source could not be read: the message names the file or URL and what was wrong."""


@dataclass(frozen=True)
class Loaded:
    """A schedule and the data mean its document carried (None when it carried none)."""

    schedule: Any
    data_mean: Optional[Any] = None


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source.strip()).scheme.lower() in ("http", "https")


def _finite_numbers(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_finite_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _data_mean(doc: dict[str, Any], origin: str) -> Optional[Any]:
    mean = doc.get("data_mean")
    if mean is not None and not _finite_numbers(mean):
        raise ScheduleSourceError(f"{origin}: data_mean must be finite numbers (a number or nested lists)")
    return mean


def schedule_from_document(doc: Any, origin: str) -> Loaded:
    """The schedule (and data mean) in a native or export document; errors name `origin` and the bad field."""
    mean = None
    if isinstance(doc, dict) and "format" in doc and isinstance(doc.get("schedule"), dict):
        mean = _data_mean(doc, origin)
        doc = doc["schedule"]
    if not isinstance(doc, dict):
        raise ScheduleSourceError(f"{origin}: a schedule document is a JSON object, got {type(doc).__name__}")
    try:
        return Loaded(load_schedule(doc), mean)
    except (ValueError, TypeError, KeyError) as e:
        raise ScheduleSourceError(f"{origin}: not a valid schedule: {e}") from None


def _parse(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleSourceError(f"{origin}: not valid JSON ({e})") from None


def read_schedule_file(path: str | os.PathLike[str]) -> Loaded:
    """The schedule in a JSON file (a native schedule or an export document)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    origin = f"schedule file {str(p)!r}"
    if not p.is_file():
        raise ScheduleSourceError(f"{origin} does not exist" if not p.exists() else f"{origin} is not a file")
    if p.stat().st_size > MAX_BYTES:
        raise ScheduleSourceError(f"{origin} is larger than {MAX_BYTES} bytes: not a schedule document")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleSourceError(f"{origin} could not be read: {e}") from None
    return schedule_from_document(_parse(text, origin), origin)


def _detail(body: bytes) -> str:
    # The service answers errors as {"detail": ...}; anything else is shown as short text.
    try:
        doc = json.loads(body.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(doc, dict) and "detail" in doc:
        return str(doc["detail"])
    return json.dumps(doc)[:200]


def _redacted(url: str) -> str:
    # A key put in the URL itself must not end up in an error message on screen.
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def fetch_schedule(url: str, api_key: Optional[str] = None, timeout: float = 30.0) -> Loaded:
    """The schedule at `url` (a job's `/schedule`), sending `api_key` in the X-API-Key header when given."""
    url = url.strip()
    if not is_url(url):
        raise ScheduleSourceError(f"{url!r} is not an http(s) URL")
    origin = f"schedule URL {_redacted(url)}"
    headers = {"Accept": "application/json", "User-Agent": "s3search-comfyui"}
    if api_key:
        headers[API_KEY_HEADER] = api_key
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        detail = _detail(e.read(4096))
        if e.code in (401, 403):
            hint = ("the API key was refused" if api_key else
                    f"an API key is required: set the node's api_key or the {API_KEY_ENV} environment variable")
            raise ScheduleSourceError(f"{origin}: HTTP {e.code}, {hint} ({detail})") from None
        raise ScheduleSourceError(f"{origin}: HTTP {e.code} ({detail})") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ScheduleSourceError(f"{origin}: no answer within {timeout:g} s") from None
        raise ScheduleSourceError(f"{origin}: could not connect ({e.reason})") from None
    except TimeoutError:
        raise ScheduleSourceError(f"{origin}: no answer within {timeout:g} s") from None
    if len(body) > MAX_BYTES:
        raise ScheduleSourceError(f"{origin}: the answer is larger than {MAX_BYTES} bytes: not a schedule document")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ScheduleSourceError(f"{origin}: the answer is not UTF-8 text") from None
    return schedule_from_document(_parse(text, origin), origin)


def read_source(source: str, api_key: str = "", timeout: float = 30.0) -> Loaded:
    """A schedule from a file path or an http(s) URL; an empty `api_key` falls back to $S3S_API_KEY."""
    source = (source or "").strip()
    if not source:
        raise ScheduleSourceError("source is empty: give a schedule JSON file or a job's /schedule URL")
    if is_url(source):
        key = (api_key or "").strip() or os.environ.get(API_KEY_ENV, "").strip() or None
        return fetch_schedule(source, key, timeout)
    return read_schedule_file(source)


def load_source(source: str, api_key: str = "", timeout: float = 30.0) -> Any:
    """The schedule alone from a file path or an http(s) URL (see `read_source`)."""
    return read_source(source, api_key, timeout).schedule
