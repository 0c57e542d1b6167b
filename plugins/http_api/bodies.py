"""Reading and checking request bodies and query strings.

Bodies are JSON objects (``Content-Type: application/json``), read up to
``[http] max_body_bytes`` (413 beyond). Every field is checked here against the
same rules the OpenAPI document states, and unknown fields are refused, so a
typo never passes silently; a bad field is a 422 problem naming it. Values are
never logged: bodies may hold passwords and mail.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from threadsync.core.mime import AttachmentIn
from threadsync.plugins.http_api.problems import ApiProblem


def invalid(field: str, message: str) -> ApiProblem:
    return ApiProblem(
        422,
        f"{field}: {message}",
        code="invalid_input",
        errors=[{"field": field, "message": message}],
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiProblem(413, f"request body larger than {limit} bytes", code="body_too_large")
    # BytesIO hands its buffer over on getvalue(): a big body is held once.
    body = io.BytesIO()
    async for chunk in request.stream():
        if body.tell() + len(chunk) > limit:
            raise ApiProblem(413, f"request body larger than {limit} bytes", code="body_too_large")
        body.write(chunk)
    return body.getvalue()


async def json_object(request: Request, limit: int) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and its raw bytes (for idempotency fingerprints)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiProblem(415, "send the body as application/json", code="unsupported_media_type")
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's stack allows
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise ApiProblem(400, "the body is not valid JSON", code="invalid_json") from None
    if _depth(data) > MAX_DEPTH:
        raise _too_deep()
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object")
    _check_strings(data, "body")
    return data, raw


#: No route takes more than a few levels; the checks below recurse, and so would
#: anything that walks the body later.
MAX_DEPTH = 32


def _too_deep() -> ApiProblem:
    return ApiProblem(
        400, f"the JSON body is nested deeper than {MAX_DEPTH} levels", code="invalid_json"
    )


def _depth(value: Any) -> int:
    """How deeply ``value`` nests arrays and objects, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _check_strings(value: Any, where: str) -> None:
    """No NUL characters or unpaired surrogates anywhere: no mail header, address or
    database text column can hold them."""
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(where, "must not contain NUL characters")
        if value.isascii():  # no copy of a big base64 string just to check it
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(where, "is not valid Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where)
            _check_strings(item, f"{where}.{key}" if where != "body" else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{where}[{i}]")


def only(body: dict[str, Any], allowed: Iterable[str]) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise invalid(extra[0], "unknown field")


def text(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    max_len: int = 998,
    default: Any = None,
    empty_ok: bool = False,
) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(name, "is required")
        return default
    if not isinstance(value, str):
        raise invalid(name, "must be a string")
    if len(value) > max_len:
        raise invalid(name, f"must be at most {max_len} characters")
    if required and not empty_ok and not value.strip():
        raise invalid(name, "must not be empty")
    return value


def flag(body: dict[str, Any], name: str, *, required: bool = False) -> bool | None:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(name, "is required")
        return None
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


def text_list(body: dict[str, Any], name: str, *, max_items: int = 500) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(name, "must be a list of strings")
    if len(value) > max_items:
        raise invalid(name, f"must have at most {max_items} items")
    if any(len(v) > 998 for v in value):
        raise invalid(name, "items must be at most 998 characters")
    return list(value)


def attachments(body: dict[str, Any]) -> list[AttachmentIn]:
    """``[{"filename", "content_type", "content_base64"}]`` decoded."""
    value = body.get("attachments")
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 100:
        raise invalid("attachments", "must be a list of at most 100 objects")
    out: list[AttachmentIn] = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, "must be an object")
        only(item, ("filename", "content_type", "content_base64"))
        filename = text(item, "filename", required=True, max_len=255)
        ctype = text(item, "content_type", max_len=255, default="application/octet-stream")
        encoded = text(item, "content_base64", required=False, max_len=1 << 31, default="")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{where}.content_base64", "is not valid base64") from None
        if "/" not in ctype:
            raise invalid(f"{where}.content_type", "must be a MIME type like text/plain")
        out.append(AttachmentIn(filename=filename, content_type=ctype, data=data))
    return out


MAX_ID = 2**31 - 1


def path_id(request: Request, name: str) -> int:
    """An integer id from the path; out of range is simply not found."""
    value = int(request.path_params[name])
    if value > MAX_ID:
        raise ApiProblem(404, f"{name} {value} not found", code="not_found")
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(name, "must be a whole number") from None
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}")
    return value


def query_text(request: Request, name: str, max_len: int = 255) -> str | None:
    raw = request.query_params.get(name)
    if raw is not None and (not raw or len(raw) > max_len):
        raise invalid(name, f"must be 1-{max_len} characters")
    return raw
