"""``threadsync demo`` as a newcomer runs it: one subprocess, the whole story.

Every step's expected outcome is checked twice: in the ``--json`` transcript
(expected equals observed) and independently in the database the demo leaves
in ``--data-dir``. Afterwards nothing of the demo runs and its ports are closed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from tests.daemonproc import port_open, processes_mentioning
from threadsync.core.store.models import (
    Attachment,
    Connection,
    Event,
    Message,
    OutboxEntry,
    SyncedThread,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS = [
    "mail_system", "labs_gate", "connect", "crm_send", "contact_reply", "client_reply",
    "crm_reply", "synced_thread", "personal_thread", "large_attachment", "update_email",
    "disconnect", "shutdown",
]  # fmt: skip


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    data = tmp_path_factory.mktemp("demo") / "data"
    proc = demo("--json", "demo", "--data-dir", str(data))
    yield json.loads(proc.stdout), data


@pytest.fixture
def session(run: tuple[dict[str, Any], Path]) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{run[1] / 'threadsync.db'}")
    with Session(engine) as db:
        yield db
    engine.dispose()


def step(transcript: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in transcript["steps"] if s["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_every_step_went_as_expected(run: tuple[dict[str, Any], Path]) -> None:
    transcript, data = run
    assert [s["name"] for s in transcript["steps"]] == STEPS
    for s in transcript["steps"]:
        assert s["ok"] and s["error"] is None, s
        assert s["expected"], f"step {s['name']} expects nothing"
        assert {k: s["observed"].get(k) for k in s["expected"]} == s["expected"], s["name"]
        assert s["title"] and s["explanation"] and s["changes"]
    assert transcript["ok"] is True and transcript["kept"] is True
    assert transcript["duration_seconds"] < 60
    assert Path(transcript["data_dir"]) == data.resolve()


def test_nothing_is_left_running(run: tuple[dict[str, Any], Path]) -> None:
    transcript, data = run
    ports = step(transcript, "mail_system")["details"]
    assert not port_open(ports["smtp_port"]) and not port_open(ports["imap_port"])
    assert processes_mentioning(str(data)) == []


def test_the_database_tells_the_same_story(
    run: tuple[dict[str, Any], Path], session: Session
) -> None:
    transcript, _ = run
    first = step(transcript, "crm_send")["details"]["thread_id"]
    second = step(transcript, "update_email")["details"]["thread_id"]
    unsynced = step(transcript, "disconnect")["details"]["unsynced_thread_id"]

    conns = session.scalars(select(Connection).order_by(Connection.id)).all()
    assert [(c.email, c.state) for c in conns] == [
        ("ann@example.test", "replaced"), ("ann.new@example.test", "disconnected"),
    ]  # fmt: skip
    assert all(c.secrets is None for c in conns), "credentials must be deleted"

    threads = {t.id: t for t in session.scalars(select(SyncedThread))}
    assert set(threads) == {first, second, unsynced}
    assert (threads[first].state, threads[first].stop_reason) == ("stopped", "replaced")
    assert (threads[second].state, threads[second].stop_reason) == ("stopped", "disconnected")
    assert (threads[unsynced].state, threads[unsynced].stop_reason) == ("unsynced", "no_connection")

    rows = session.scalars(
        select(Message).where(Message.thread_id == first).order_by(Message.id)
    ).all()
    synced = step(transcript, "synced_thread")["expected"]["message_ids"]
    assert [m.message_id for m in rows[:4]] == synced
    assert [(m.direction, m.origin, m.state) for m in rows] == [
        ("outbound", "crm", "synced"), ("inbound", "mailbox", "synced"),
        ("outbound", "mailbox", "synced"), ("outbound", "crm", "synced"),
        ("inbound", "mailbox", "skipped"), ("outbound", "crm", "skipped"),
    ]  # fmt: skip
    assert (
        len({m.message_id for m in session.scalars(select(Message))})
        == session.query(Message).count()
    ), "a message is stored twice"


def test_skipped_and_personal_mail_left_no_content(
    run: tuple[dict[str, Any], Path], session: Session
) -> None:
    transcript, _ = run
    large = step(transcript, "large_attachment")["details"]
    inbound = session.scalars(
        select(Message).where(Message.message_id == large["message_id"])
    ).one()
    assert (inbound.state, inbound.reason, inbound.text, inbound.html) == (
        "skipped",
        "attachment_too_large",
        None,
        None,
    )
    (attachment,) = session.scalars(
        select(Attachment).where(Attachment.message_pk == inbound.id)
    ).all()
    assert (attachment.size, attachment.content) == (4 * 1024 * 1024, None)
    crm = session.scalars(
        select(Message).where(Message.message_id == large["crm_message_id"])
    ).one()
    assert (crm.state, crm.reason) == ("skipped", "attachment_too_large")
    entry = session.scalars(select(OutboxEntry).where(OutboxEntry.message_pk == crm.id)).one()
    assert (entry.channel, entry.status) == ("default", "sent")

    personal = step(transcript, "personal_thread")["details"]["personal_message_ids"]
    assert session.scalars(select(Message).where(Message.message_id.in_(personal))).all() == []
    for event in session.scalars(select(Event)):
        assert not any(mid in json.dumps(event.payload) for mid in personal)
    assert {e.status for e in session.scalars(select(OutboxEntry))} == {"sent"}


def test_the_kept_folder_can_be_looked_at_with_the_cli(run: tuple[dict[str, Any], Path]) -> None:
    _, data = run
    config = data / "config.toml"
    threads = json.loads(demo("--config", str(config), "--json", "threads", "demo-agency").stdout)
    assert len(threads["threads"]) == 3
    outside = json.loads(
        demo("--config", str(config), "--json", "mailserver", "--list-outside").stdout
    )
    senders = {m["envelope_from"] for m in outside["messages"]}
    assert senders == {"ann@example.test", "ann.new@example.test", "crm@threadsync.local"}


def test_text_output_reads_as_a_story_and_removes_its_temporary_data(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = demo("demo", env={"TMPDIR": str(tmp)}).stdout
    assert "A 4 MB attachment does not sync" in out and "NOT AS EXPECTED" not in out
    assert "all 13 steps went as expected" in out
    assert list(tmp.iterdir()) == []
