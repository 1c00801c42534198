"""Reading a request: its JSON body, its models, its query parameters and its wait.

Each reader raises :class:`~flowgate.services.api.errors.ApiError` naming what is wrong
(400 with the field, 413, 415), so endpoints only read and answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from flowgate.services.api.errors import ApiError
from flowgate.services.api.prefer import parse_prefer

Model = TypeVar("Model", bound=BaseModel)


async def read_json(request: Request, limit: int, *, timeout_s: float) -> Any:
    """The body as JSON: 415 unless it is declared JSON, 413 beyond ``limit`` bytes (checked
    while reading, so a lying or missing Content-Length cannot get past it), 408 when it does
    not arrive within ``timeout_s``, 400 if broken."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(408, f"the body did not arrive within {timeout_s:g} s") from exc
    body = b"".join(chunks)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from exc
    if _LONG_NUMBER.search(body):
        # orjson turns an integer beyond 64 bits into an inexact float without a word; read
        # such a body again with exact integers, so that a variable holding one is refused
        # by name (shared/variables.py) instead of silently changed.
        value = json.loads(body, parse_int=_exact_int)
    return value


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is larger than {limit} bytes")


#: 19 or more digits in a row: possibly an integer beyond 64 bits (the shortest such is
#: -9223372036854775809; rare, so only then is the body read twice).
_LONG_NUMBER = re.compile(rb"\d{19,}")


def _exact_int(text: str) -> int:
    # int() refuses texts of thousands of digits; any such number is far out of range.
    return int(text) if len(text) <= 40 else 2**64


def parse_model(model: type[Model], obj: Any, context: dict[str, Any] | None = None) -> Model:
    """Validate a body; 400 naming the first field at fault."""
    try:
        return model.model_validate(obj, context=context)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        if field is None:
            raise ApiError(400, "the body must be a JSON object") from exc
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{field}: {message}", field=field) from exc


def int_param(
    request: Request, name: str, *, default: int, low: int, high: int | None = None
) -> int:
    """An integer query parameter within ``[low, high]``; 400 naming it otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = None
    if raw.isascii() and raw.isdigit():
        value = int(raw) if len(raw) <= 18 else 10**18  # far past any bound; int() caps digits
    if value is None or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be an integer {bound}", field=name)
    return value


def wait_budget(request: Request, *, default_ms: int, max_ms: int) -> tuple[float, dict[str, str]]:
    """This request's wait in seconds and the headers that say what was honoured.

    ``?wait=N`` beats ``Prefer: wait=N`` beats the default; all are capped by ``max_ms``
    (MAX_WAIT_MS). ``Prefer: respond-async`` (without a wait) means do not wait at all.
    """
    cap_s = max_ms / 1000
    prefs = parse_prefer(request.headers.getlist("prefer"))
    headers = {"Vary": "Prefer"}
    if "wait" in request.query_params:
        query_wait = int_param(request, "wait", default=0, low=0)
        return min(float(query_wait), cap_s), headers
    if prefs.wait_s is not None:
        wait_s = min(float(prefs.wait_s), cap_s)
        return wait_s, {**headers, "Preference-Applied": f"wait={int(wait_s)}"}
    if prefs.respond_async:
        return 0.0, {**headers, "Preference-Applied": "respond-async"}
    return min(default_ms / 1000, cap_s), headers


#: The CALLBACK_ALLOWED_HOSTS entry that allows any host.
ANY_HOST = "*"


def check_target(url: str, allowed: Sequence[str]) -> str | None:
    """Why ``url`` may not be a callback target, or None when it may.

    It must be an absolute http(s) URL whose host ``allowed`` (CALLBACK_ALLOWED_HOSTS) lets
    through: one of the names listed, an IP address inside one of the CIDRs listed, or any
    host with ``*``. Nothing listed allows nothing: callbacks are off.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        return f"callbackUrl is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not host:
        return "callbackUrl must be an absolute http:// or https:// URL"
    if not allowed:
        return "callbackUrl: callbacks are off here (CALLBACK_ALLOWED_HOSTS allows no host)"
    if ANY_HOST not in allowed and not _allowed(host, allowed):
        return f"callbackUrl: host {host!r} is not in CALLBACK_ALLOWED_HOSTS"
    return None


def _allowed(host: str, allowed: Sequence[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") in {entry.lower() for entry in allowed}
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name
    return False
