"""Schemathesis against ``/openapi.json`` of a real uvicorn server: generated
requests for every operation, with an admin key and with a sub-account key, find
no 5xx, no undocumented status code or content type and no answer that breaks
its schema. The document itself must be valid OpenAPI 3.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.kernelfixtures import CONTACT, SUB, USER, make_settings
from tests.servers.smtp import SmtpServer
from tests.test_http_api_support import (
    http_settings,
)
from threadsync.core.api import Threadsync
from threadsync.core.host import apikeys
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.server import ThreadedServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: Left out of fuzzing: switching Labs on for random sub-accounts would let
#: random connect requests reach random hosts. test_http_api covers it.
NOT_FUZZED = {("PUT", "/v1/subaccounts/{subaccount}/labs")}
EXAMPLES = 15


@pytest.fixture
def served(
    tmp_path: Path, scenario_database_url: str, relay: SmtpServer
) -> Iterator[dict[str, Any]]:
    settings = make_settings(tmp_path, scenario_database_url, relay.port)
    Threadsync.init(settings)
    ts = Threadsync.from_settings(settings)
    http = http_settings()
    app, _ = create_app(ts, http)
    server = ThreadedServer(app, http).start()
    try:
        store = ts.kernel.store
        yield {
            "ts": ts,
            "url": server.url,
            "admin": apikeys.create(store, None)["key"],
            "key": apikeys.create(store, SUB)["key"],
        }
    finally:
        server.stop()
        ts.close()


def fuzz(url: str, key: str, subaccount: str | None) -> int:
    spec = httpx.get(f"{url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"Authorization": f"Bearer {key}"}
    calls = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in NOT_FUZZED:
            continue

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        def check(case: Any) -> None:
            nonlocal calls
            if subaccount is not None and "subaccount" in (case.path_parameters or {}):
                case.path_parameters["subaccount"] = subaccount
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=30)
            calls += 1

        check()
    return calls


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_no_server_error_and_no_schema_violation(served: dict[str, Any]) -> None:
    ts = served["ts"]
    sent = await ts.send(SUB, USER, Draft(to=[CONTACT], subject="seed", text="seed"))
    assert sent["status"] == "sent"
    calls = fuzz(served["url"], served["admin"], None)
    calls += fuzz(served["url"], served["key"], SUB)
    assert calls > 300
    # The fuzzing never touched Labs: no connect could have reached a random host.
    assert ts.labs_status(SUB)["two_way_email_sync"] is False


def test_the_document_is_valid_openapi() -> None:
    from threadsync.plugins.http_api.openapi import document

    schema = schemathesis.openapi.from_dict(document())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 30
    assert all(op.definition.raw.get("responses") for op in operations)
