"""The API's front door, against the real uvicorn server on loopback: connections
that never finish their request headers are closed, each client address may
hold only so many connections, requests with bad keys are rate-limited per
client address before any key lookup, and rate-limit buckets hold across API
processes that share one database."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.kernelfixtures import SUB
from tests.test_http_api import is_problem
from tests.test_http_api_support import Api, api_factory_fixture  # noqa: F401 (fixtures)


def address(api: Api) -> tuple[str, int]:
    host, port = httpx.URL(api.url).host, httpx.URL(api.url).port
    assert port is not None
    return host, port


def closed_by_server(sock: socket.socket, within: float, drip: bytes = b"") -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (sending
    ``drip`` a byte at a time meanwhile); False if it is still open then."""
    deadline = time.monotonic() + within
    sock.settimeout(0.25)
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sent < len(drip):
                sock.send(drip[sent : sent + 1])
                sent += 1
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed as well
            return True
    return False


def test_half_open_connections_are_closed_and_limited_per_client(
    api_factory: Callable[..., Api],
) -> None:
    api = api_factory(max_connections_per_client=4, header_timeout_seconds=1.0)
    socks = [socket.create_connection(address(api), timeout=5) for _ in range(7)]
    try:
        # Over the limit: closed at once (well before the header timeout).
        assert sum(closed_by_server(s, 0.8) for s in socks[4:]) == 3
        # Within it: closed when the headers do not arrive in time, also while
        # they trickle in a byte at a time.
        socks[0].sendall(b"GET /healthz HTTP/1.1\r\n")
        drip = b"Host: x\r\nX-Slow: " + b"a" * 200
        assert closed_by_server(socks[0], 15, drip)
        assert all(closed_by_server(s, 15) for s in socks[1:4])
    finally:
        for s in socks:
            s.close()
    # The door is open for whoever asks properly.
    with httpx.Client(base_url=api.url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        with c.stream("GET", "/healthz") as r:  # a keep-alive connection still works
            assert r.status_code == 200
        assert c.get("/healthz").status_code == 200


def test_bad_keys_are_rate_limited_per_client_address(
    api_factory: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = api_factory(auth_failures_per_second=0.01, auth_failures_burst=5)
    lookups: list[str] = []
    keys = api.world.ts.api_keys
    real = keys.authenticate

    def counting(presented: str) -> Any:
        lookups.append(presented)
        return real(presented)

    monkeypatch.setattr(keys, "authenticate", counting)
    url = f"/v1/subaccounts/{SUB}/connections"
    with api.client(api.key) as good:
        assert good.get(url).status_code == 200  # known (and remembered) before
    with api.client("tsk_guessed_0") as bad:
        for n in range(5):
            r = bad.get(url, headers={"Authorization": f"Bearer tsk_guessed_{n}"})
            is_problem(r, 401, "unauthorized")
        for n in range(5, 50):
            r = bad.get(url, headers={"Authorization": f"Bearer tsk_guessed_{n}"})
            is_problem(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) >= 1
    assert len([p for p in lookups if p.startswith("tsk_guessed")]) == 5
    with api.client(api.key) as good:
        assert good.get(url).status_code == 200  # a known key from there still works
    # Another client address has its own bucket.
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=api.url, transport=other, timeout=10) as c:
        r = c.get(url, headers={"Authorization": "Bearer tsk_guessed_x"})
        is_problem(r, 401, "unauthorized")


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
def test_rate_limits_hold_across_api_processes(api_factory: Callable[..., Api]) -> None:
    """Two API servers (each with its own memory, as two processes) on one
    database: one key's burst is shared between them."""
    over: dict[str, Any] = {"rate_per_second": 0.01, "burst": 6}
    first = api_factory(**over)
    second = api_factory(**over)
    key = first.key
    url = f"/v1/subaccounts/{SUB}/connections"
    answers = []
    for n in range(10):
        api = first if n % 2 == 0 else second
        with api.client(key) as c:
            answers.append(c.get(url).status_code)
    assert answers == [200] * 6 + [429] * 4
    # Bad keys count against the client address across both as well.
    bad: dict[str, Any] = {"auth_failures_per_second": 0.01, "auth_failures_burst": 3}
    a, b = api_factory(**bad), api_factory(**bad)
    codes = []
    for n in range(6):
        api = a if n % 2 == 0 else b
        with api.client(f"tsk_nope_{n}") as c:
            codes.append(c.get(url).status_code)
    assert codes == [401] * 3 + [429] * 3
