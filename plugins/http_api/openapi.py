"""The OpenAPI 3.1 document served at ``/openapi.json``, written by hand.

It describes exactly what the routes accept and answer: request bodies are
checked by :mod:`threadsync.plugins.http_api.bodies` with the same limits, response shapes
are those of the command line (with the extra keys the API adds), and every error is
an RFC 9457 problem. The test suite fuzzes the API against this document, so a
drift between the two fails there.
"""

from __future__ import annotations

from typing import Any

from threadsync.core.host.webhooks import STATUSES
from threadsync.plugins.http_api.openapi_schemas import ID, SCHEMAS, Schema, ref

_TEXT_FOR = {
    400: "Malformed request (not JSON) or a bad provider option.",
    401: "No valid API key.",
    403: "Needs an admin key, or the sub-account's Labs flag is off.",
    404: "No such object for this key (another sub-account's objects are not found).",
    409: "Refused by a rule (already connected, a sign-in already used).",
    413: "Request body too large.",
    415: "The body must be application/json.",
    422: "A field is invalid.",
    429: "Rate limit exceeded; see Retry-After.",
    502: "The mailbox provider failed.",
    503: "The database is unavailable.",
}
READ = (401, 404, 422, 429, 503)
WRITE = (400, 401, 403, 404, 409, 413, 415, 422, 429, 502, 503)


def _problems(codes: tuple[int, ...]) -> dict[str, Any]:
    return {
        str(code): {
            "description": _TEXT_FOR[code],
            "content": {"application/problem+json": {"schema": ref("Problem")}},
        }
        for code in codes
    }


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def _param(name: str, where: str = "path", schema: Schema | None = None, **more: Any) -> Schema:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or ID,
        **more,
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    errors: tuple[int, ...],
    *,
    params: list[Schema] | None = None,
    body: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_problems(errors)}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(body)}},
        }
    return op


SUB = _param("subaccount")
USER = _param("user")
THREAD = _param("thread_id")
IDEMPOTENCY = _param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    description="A retried request with the same key is answered from the first; never sent twice.",
)
PAGE = [
    _param("after", "query", {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
]
PLAIN = {"text/plain": {"schema": {"type": "string"}}}
HTML = {"text/html": {"schema": {"type": "string"}}}
CALLBACK = (
    "Where the browser comes back from the provider's consent page. The sign-in "
    "named by `state` is finished here (the connection is made before the page "
    "answers) and the user sees a short page; the CRM reads the outcome from the "
    "sign-in's `Location`. A `state` is accepted once."
)
CALLBACK_PAGES = {
    "200": {"description": "Connected", "content": HTML},
    "4XX": {
        "description": "Not connected: unknown or used `state`, declined consent, "
        "or another account signed in",
        "content": HTML,
    },
    "5XX": {"description": "The mailbox or the provider failed", "content": HTML},
}
OPEN: list[Any] = []


def _paths() -> dict[str, Any]:
    s = "/v1/subaccounts/{subaccount}"
    conn = s + "/users/{user}/connection"
    msg = "/v1/threads/{thread_id}/messages/{message_id}"
    connected = {
        "202": _json("SignIn", "The provider needs the user: open consent_url, poll the sign-in."),
    }
    return {
        s + "/labs": {
            "parameters": [SUB],
            "get": _op("Labs flag of a sub-account", {"200": _json("Labs")}, READ),
            "put": _op(
                "Switch the Labs flag (admin)", {"200": _json("Labs")}, WRITE, body="LabsUpdate"
            ),
        },
        s + "/connections": {
            "parameters": [SUB],
            "get": _op(
                "Connections of a sub-account, past ones too",
                {"200": _json("ConnectionList")},
                READ,
                params=[_param("user", "query")],
            ),
        },
        conn: {
            "parameters": [SUB, USER],
            "get": _op("Connections of one user", {"200": _json("ConnectionList")}, READ),
            "post": _op(
                "Connect the user's mailbox (Labs must be on)",
                {"201": _json("Connection", "Connected"), **connected},
                WRITE,
                body="ConnectRequest",
            ),
            "put": _op(
                "Replace the user's address without a gap (update-email)",
                {"200": _json("Connection", "Connected"), **connected},
                WRITE,
                body="ConnectRequest",
            ),
            "delete": _op("Disconnect the user's mailbox", {"200": _json("Connection")}, WRITE),
        },
        s + "/sign-ins/{sign_in_id}": {
            "parameters": [SUB, _param("sign_in_id")],
            "get": _op("State of an interactive sign-in", {"200": _json("SignIn")}, READ),
        },
        s + "/users/{user}/send": {
            "parameters": [SUB, USER],
            "post": _op(
                "Send a new email from the CRM",
                {"201": _json("SendResult", "Stored; sent or queued")},
                WRITE,
                params=[IDEMPOTENCY],
                body="SendRequest",
            ),
        },
        "/v1/threads/{thread_id}/reply": {
            "parameters": [THREAD],
            "post": _op(
                "Reply from the CRM in a thread",
                {"201": _json("SendResult", "Stored; sent or queued")},
                WRITE,
                params=[IDEMPOTENCY],
                body="ReplyRequest",
            ),
        },
        s + "/threads": {
            "parameters": [SUB],
            "get": _op(
                "Threads of a sub-account",
                {"200": _json("ThreadList")},
                READ,
                params=[_param("user", "query")],
            ),
        },
        "/v1/threads/{thread_id}": {
            "parameters": [THREAD],
            "get": _op("One thread with all its messages", {"200": _json("Thread")}, READ),
        },
        msg: {
            "parameters": [THREAD, _param("message_id", schema={"type": "string", "minLength": 1})],
            "get": _op(
                "One message (Message-ID with angle brackets, percent-encoded)",
                {"200": _json("MessageInThread")},
                READ,
            ),
        },
        msg + "/attachments/{index}": {
            "parameters": [
                THREAD,
                _param("message_id", schema={"type": "string", "minLength": 1}),
                _param("index", schema={"type": "integer", "minimum": 0}),
            ],
            "get": _op(
                "Download an attachment of a synced message",
                {
                    "200": {
                        "description": "The content",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    }
                },
                READ,
            ),
        },
        s + "/events": {
            "parameters": [SUB],
            "get": _op(
                "The event log, oldest first", {"200": _json("EventList")}, READ, params=PAGE
            ),
        },
        s + "/webhooks": {
            "parameters": [SUB],
            "get": _op("Webhook endpoints", {"200": _json("WebhookList")}, READ),
            "post": _op(
                "Add a webhook endpoint; its secret is shown once",
                {"201": _json("WebhookCreated", "Created")},
                WRITE,
                body="WebhookCreate",
            ),
        },
        s + "/webhooks/{endpoint_id}": {
            "parameters": [SUB, _param("endpoint_id", schema={"type": "integer", "minimum": 0})],
            "get": _op("One webhook endpoint", {"200": _json("Webhook")}, READ),
            "delete": _op(
                "Delete an endpoint; its pending deliveries become dead",
                {"200": _json("Webhook")},
                READ,
            ),
        },
        s + "/webhook-deliveries": {
            "parameters": [SUB],
            "get": _op(
                "Webhook deliveries (status=dead: the dead letters)",
                {"200": _json("DeliveryList")},
                READ,
                params=[
                    _param("status", "query", {"type": "string", "enum": list(STATUSES)}),
                    _param(
                        "endpoint_id",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                    ),
                    *PAGE,
                ],
            ),
        },
        s + "/webhook-deliveries/{delivery_id}/retry": {
            "parameters": [SUB, _param("delivery_id", schema={"type": "integer", "minimum": 0})],
            "post": _op("Send a dead delivery again", {"200": _json("Delivery")}, READ),
        },
        "/v1/api-keys": {
            "get": _op(
                "API keys (admin)",
                {"200": _json("ApiKeyList")},
                (*READ, 403),
                params=[_param("subaccount", "query")],
            ),
            "post": _op(
                "Make an API key (admin); the key is shown once",
                {"201": _json("ApiKeyCreated", "Created")},
                WRITE,
                body="ApiKeyCreate",
            ),
        },
        "/v1/api-keys/{key_id}": {
            "parameters": [_param("key_id")],
            "delete": _op("Revoke an API key (admin)", {"200": _json("ApiKey")}, (*READ, 403)),
        },
        **_service_paths(),
    }


def _service_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "summary": "The process serves",
                "security": OPEN,
                "responses": {"200": {"description": "OK", "content": {"application/json": {}}}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "The database answers at the newest schema",
                "security": OPEN,
                "responses": {
                    "200": {"description": "Ready", "content": {"application/json": {}}},
                    **_problems((503,)),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (admin key unless metrics_public)",
                "responses": {
                    "200": {"description": "Text exposition 0.0.4", "content": PLAIN},
                    **_problems((401, 403, 429, 503)),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": OPEN,
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}
                },
            }
        },
        "/notifications/{provider}": {
            "post": {
                "summary": "Provider change notifications (Microsoft Graph: provider outlook)",
                "security": OPEN,
                "parameters": [
                    _param("provider"),
                    _param("validationToken", "query", {"type": "string"}),
                ],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "200": {"description": "The validation token, echoed", "content": PLAIN},
                    "202": {"description": "Accepted; the connection is woken", "content": PLAIN},
                    "400": {"description": "Not a notification", "content": PLAIN},
                    **_problems((404, 413)),
                },
            }
        },
        "/oauth/callback": {
            "post": {
                "summary": "OAuth redirect of an interactive sign-in (form_post)",
                "description": CALLBACK,
                "security": OPEN,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            }
                        }
                    },
                },
                "responses": {**CALLBACK_PAGES, **_problems((413,))},
            },
            "get": {
                "summary": "OAuth redirect of an interactive sign-in",
                "description": CALLBACK,
                "security": OPEN,
                "responses": CALLBACK_PAGES,
            },
        },
        "/": {
            "get": {
                "summary": "Operator status page (admin session cookie)",
                "security": OPEN,
                "responses": {
                    "200": {"description": "The page or the sign-in form", "content": HTML},
                    "303": {"description": "Signed in with ?key="},
                    "401": {"description": "Wrong key", "content": HTML},
                },
            }
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "threadsync HTTP API",
            "version": "1",
            "description": "Two-way email sync between a CRM and each user's own mailbox. "
            "Authenticate with Authorization: Bearer <API key>. A sub-account key reaches "
            "only its own sub-account; other sub-accounts' objects answer 404. Errors are "
            "RFC 9457 problem details.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
