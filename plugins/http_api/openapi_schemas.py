"""The component schemas of the OpenAPI document (:mod:`threadsync.plugins.http_api.openapi`):
the JSON shapes of the command line as the routes answer them, and the request bodies
with the limits :mod:`threadsync.plugins.http_api.bodies` enforces."""

from __future__ import annotations

from typing import Any

from threadsync.core.host.webhooks import EVENT_TYPES, STATUSES
from threadsync.core.rules import ConnectionState, MessageState, SendStatus, ThreadState

Schema = dict[str, Any]

CONNECTION_STATES = [s.value for s in ConnectionState]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def _obj(required: list[str], props: dict[str, Schema], *, extra: bool = True) -> Schema:
    schema: Schema = {"type": "object", "required": required, "properties": props}
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _list(key: str, item: str) -> Schema:
    return _obj([key], {key: {"type": "array", "items": ref(item)}})


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
ID = {"type": "string", "minLength": 1, "maxLength": 255}
ADDRESSES = {"type": "array", "maxItems": 500, "items": {"type": "string", "maxLength": 998}}

SCHEMAS: dict[str, Schema] = {
    "Problem": _obj(
        ["type", "title", "status", "detail"],
        {
            "type": STR,
            "title": STR,
            "status": INT,
            "detail": STR,
            "code": STR,
            "instance": STR,
            "errors": {
                "type": "array",
                "items": _obj(["field", "message"], {"field": STR, "message": STR}),
            },
        },
    ),
    "Labs": _obj(
        ["subaccount", "two_way_email_sync"], {"subaccount": STR, "two_way_email_sync": BOOL}
    ),
    "LabsUpdate": _obj(["two_way_email_sync"], {"two_way_email_sync": BOOL}, extra=False),
    "Connection": _obj(
        [
            "subaccount",
            "user",
            "provider",
            "email",
            "state",
            "paused",
            "since",
            "last_error",
            "last_sync_at",
        ],
        {
            "id": INT,
            "subaccount": STR,
            "user": STR,
            "provider": STR,
            "email": STR,
            "state": {"type": "string", "enum": CONNECTION_STATES},
            "paused": BOOL,
            "since": _nullable("string"),
            "last_error": _nullable("string"),
            "last_sync_at": _nullable("string"),
            "worker": _nullable("string"),
        },
    ),
    "ConnectionList": _list("connections", "Connection"),
    "ConnectRequest": _obj(
        ["provider", "email"],
        {
            "provider": {"type": "string", "minLength": 1, "maxLength": 64},
            "email": {"type": "string", "minLength": 1, "maxLength": 320},
            "options": {
                "type": "object",
                "description": "Provider options by name (imap_host, smtp_port, security...); "
                "never *_env options.",
                "additionalProperties": {"type": ["string", "integer", "boolean"]},
            },
            "credentials": {
                "type": "object",
                "description": "Secrets by name without _env (password, access_token).",
                "additionalProperties": {"type": "string"},
            },
        },
        extra=False,
    ),
    "SignIn": _obj(
        ["id", "subaccount", "user", "state", "message", "consent_url", "connection", "error"],
        {
            "id": STR,
            "subaccount": STR,
            "user": STR,
            "state": {
                "type": "string",
                "enum": ["pending", "finishing", "connected", "failed", "expired"],
            },
            "message": _nullable("string"),
            "consent_url": _nullable("string"),
            "connection": {"oneOf": [ref("Connection"), {"type": "null"}]},
            "error": _nullable("object"),
            "provider": STR,
            "email": STR,
            "purpose": {"type": "string", "enum": ["connect", "update_email"]},
            "expires_at": _nullable("string"),
        },
    ),
    "AttachmentIn": _obj(
        ["filename"],
        {
            "filename": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"\S"},
            "content_type": {"type": "string", "maxLength": 255, "pattern": "/"},
            "content_base64": {"type": "string", "contentEncoding": "base64"},
        },
        extra=False,
    ),
    "SendRequest": _obj(
        ["to", "subject", "text"],
        {
            "to": {**ADDRESSES, "minItems": 1},
            "cc": ADDRESSES,
            "subject": {"type": "string", "maxLength": 998, "pattern": r"\S"},
            "text": {"type": "string"},
            "html": _nullable("string"),
            "attachments": {"type": "array", "maxItems": 100, "items": ref("AttachmentIn")},
        },
        extra=False,
    ),
    "ReplyRequest": _obj(
        ["text"],
        {
            "to": ADDRESSES,
            "cc": ADDRESSES,
            "subject": {"type": "string", "maxLength": 998},
            "text": {"type": "string"},
            "html": _nullable("string"),
            "attachments": {"type": "array", "maxItems": 100, "items": ref("AttachmentIn")},
        },
        extra=False,
    ),
    "SendResult": _obj(
        ["thread_id", "message_id", "channel", "synced", "reason", "status"],
        {
            "thread_id": STR,
            "message_id": STR,
            "channel": {"type": "string", "enum": ["mailbox", "default"]},
            "synced": BOOL,
            "reason": _nullable("string"),
            "status": {"type": "string", "enum": [s.value for s in SendStatus]},
        },
    ),
    "ThreadSummary": _obj(
        [
            "thread_id",
            "subaccount",
            "user",
            "email",
            "state",
            "stop_reason",
            "subject",
            "message_count",
        ],
        {
            "thread_id": STR,
            "subaccount": STR,
            "user": STR,
            "email": _nullable("string"),
            "state": {"type": "string", "enum": [s.value for s in ThreadState]},
            "stop_reason": _nullable("string"),
            "subject": STR,
            "message_count": INT,
        },
    ),
    "ThreadList": _list("threads", "ThreadSummary"),
    "Attachment": _obj(
        ["filename", "content_type", "size", "index", "download_url"],
        {
            "filename": _nullable("string"),
            "content_type": STR,
            "size": INT,
            "index": INT,
            "download_url": {
                **_nullable("string"),
                "description": "Only synced messages keep attachment content.",
            },
        },
    ),
    "Message": _obj(
        [
            "message_id",
            "direction",
            "origin",
            "from",
            "to",
            "cc",
            "subject",
            "date",
            "state",
            "reason",
            "text",
            "html",
            "attachments",
            "defects",
        ],
        {
            "message_id": STR,
            "direction": {"type": "string", "enum": ["inbound", "outbound"]},
            "origin": {"type": "string", "enum": ["crm", "mailbox"]},
            "from": _nullable("string"),
            "to": {"type": "array", "items": STR},
            "cc": {"type": "array", "items": STR},
            "subject": STR,
            "date": _nullable("string"),
            "received_at": {
                "type": "string",
                "description": "When threadsync stored the message (UTC); shown when it "
                "has no Date header.",
            },
            "state": {"type": "string", "enum": [s.value for s in MessageState]},
            "reason": _nullable("string"),
            "text": _nullable("string"),
            "html": _nullable("string"),
            "attachments": {"type": "array", "items": ref("Attachment")},
            "defects": {
                "type": "array",
                "items": STR,
                "description": "What could not be read or had to be repaired when the "
                "message was parsed; non-empty means parts of it may be missing.",
            },
        },
    ),
    "Event": _obj(
        ["id", "event", "subaccount"],
        {"id": INT, "event": {"type": "string", "enum": list(EVENT_TYPES)}, "subaccount": STR},
    ),
    "EventList": _list("events", "Event"),
    "Webhook": _obj(
        ["id", "subaccount", "url", "description", "events", "active", "created_at"],
        {
            "id": INT,
            "subaccount": STR,
            "url": STR,
            "description": STR,
            "events": {"type": "array", "items": {"type": "string", "enum": list(EVENT_TYPES)}},
            "active": BOOL,
            "created_at": _nullable("string"),
        },
    ),
    "WebhookList": _list("webhooks", "Webhook"),
    "WebhookCreate": _obj(
        ["url"],
        {
            "url": {
                "type": "string",
                "maxLength": 2048,
                "format": "uri",
                "description": "https (plain http only towards loopback), no user or "
                "password; a host that is or resolves to an internal address (loopback, "
                "private, link-local, ...) is refused with 422 unless the operator allows it",
            },
            "events": {
                "type": "array",
                "maxItems": len(EVENT_TYPES),
                "items": {"type": "string", "enum": list(EVENT_TYPES)},
            },
            "description": {"type": "string", "maxLength": 255},
        },
        extra=False,
    ),
    "Delivery": _obj(
        [
            "id",
            "endpoint_id",
            "event_id",
            "event",
            "status",
            "attempts",
            "next_attempt_at",
            "last_status_code",
            "last_error",
            "created_at",
            "finished_at",
        ],
        {
            "id": INT,
            "endpoint_id": INT,
            "event_id": INT,
            "event": STR,
            "status": {"type": "string", "enum": list(STATUSES)},
            "attempts": INT,
            "next_attempt_at": _nullable("string"),
            "last_status_code": _nullable("integer"),
            "last_error": _nullable("string"),
            "created_at": _nullable("string"),
            "finished_at": _nullable("string"),
        },
    ),
    "DeliveryList": _list("deliveries", "Delivery"),
    "ApiKey": _obj(
        ["key_id", "subaccount", "admin", "label", "created_at", "revoked_at"],
        {
            "key_id": STR,
            "subaccount": _nullable("string"),
            "admin": BOOL,
            "label": STR,
            "created_at": _nullable("string"),
            "revoked_at": _nullable("string"),
        },
    ),
    "ApiKeyList": _list("keys", "ApiKey"),
    "ApiKeyCreate": _obj(
        [],
        {"subaccount": ID, "admin": BOOL, "label": {"type": "string", "maxLength": 255}},
        extra=False,
    ),
}
SCHEMAS["Thread"] = {
    "allOf": [
        ref("ThreadSummary"),
        _obj(["messages"], {"messages": {"type": "array", "items": ref("Message")}}),
    ]
}
SCHEMAS["MessageInThread"] = {"allOf": [ref("Message"), _obj(["thread_id"], {"thread_id": STR})]}
SCHEMAS["WebhookCreated"] = {
    "allOf": [ref("Webhook"), _obj(["secret"], {"secret": {"type": "string"}})]
}
SCHEMAS["ApiKeyCreated"] = {"allOf": [ref("ApiKey"), _obj(["key"], {"key": {"type": "string"}})]}
