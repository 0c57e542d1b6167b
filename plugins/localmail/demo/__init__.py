"""``threadsync demo``: the whole story on the embedded defaults, in one process.

:func:`run_demo` makes a data folder (a temporary one, removed at the end, or
``--data-dir``), starts the local mail system on free loopback ports in a
background thread, creates a SQLite database there with ``Threadsync.init``,
and tells the story of :mod:`.story` through the public Python API. It returns
the transcript: every step with what was expected and what was observed.
Before returning, the mail system and the database are closed: no process,
thread or port is left behind.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from threadsync.core.api import Threadsync
from threadsync.core.config import Settings, from_mapping
from threadsync.core.errors import InvalidInput, ThreadsyncError
from threadsync.plugins.localmail.demo.story import (
    ANN,
    ANN_NEW,
    CARLA,
    CRM_FROM,
    PASSWORD_ENV,
    PEOPLE_ERRORS,
    SUB,
    USER,
    Story,
    port_open,
)
from threadsync.plugins.localmail.demo.transcript import Step, render_step
from threadsync.plugins.localmail.serve import keep_temp_files_beside
from threadsync.plugins.localmail.settings import MailserverSettings, UserSpec
from threadsync.plugins.localmail.system import MailSystemThread

__all__ = ["introduction", "render_step", "run_demo", "summary"]

#: Written into a kept data folder, so the CLI can look at what the demo left:
#: ``threadsync --config DIR/config.toml threads demo-agency``.
_CONFIG = """\
# Made by `threadsync demo`. Look around with, for example:
#   threadsync --config {dir}/config.toml threads {sub}
#   threadsync --config {dir}/config.toml mailserver --list-outside
[database]
url = "sqlite:///threadsync.db"

[security]
secret_key_file = "secret.key"

[outbound.default]
host = "127.0.0.1"
port = 2525
security = "none"
from_address = "{crm}"

[mailserver]
data_dir = "mail"
"""


def _settings(data_dir: Path, relay_port: int) -> Settings:
    raw = {
        "database": {"url": "sqlite:///threadsync.db"},
        "security": {"secret_key_file": "secret.key"},
        "outbound": {
            "default": {
                "host": "127.0.0.1",
                "port": relay_port,
                "security": "none",
                "from_address": CRM_FROM,
            }
        },
    }
    return from_mapping(raw, base=data_dir)


def _prepare(data_dir: Path | None) -> tuple[Path, bool]:
    if data_dir is None:
        return Path(tempfile.mkdtemp(prefix="threadsync-demo-")), False
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise InvalidInput(f"--data-dir {data_dir} must be a new or empty folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir.resolve(), True


async def _tell(
    ts: Threadsync,
    mail: MailSystemThread,
    passwords: dict[str, str],
    on_step: Callable[[Step], None],
) -> list[Step]:
    story = Story(ts, mail, passwords)
    steps: list[Step] = []
    for number, (name, title, act) in enumerate(story.steps(), start=1):
        step = Step(number, name, title, "")
        try:
            await act(step)
        except _STEP_ERRORS as exc:
            step.error = f"{exc.__class__.__name__}: {exc}"
        steps.append(step)
        on_step(step)
        if step.error is not None:
            break
    return steps


#: Failures that end the story with a note instead of a traceback.
_STEP_ERRORS: tuple[type[Exception], ...] = (ThreadsyncError, OSError, TimeoutError, *PEOPLE_ERRORS)


def _shutdown_step(number: int, host: str, ports: tuple[int, int]) -> Step:
    step = Step(
        number,
        "shutdown",
        "Everything stops",
        "The demo closed the database and stopped the mail system: no process, "
        "thread or open port is left behind.",
    )
    step.expected = {"smtp_open": False, "imap_open": False}
    step.observed = {"smtp_open": port_open(host, ports[0]), "imap_open": port_open(host, ports[1])}
    step.changes = [f"ports {ports[0]} and {ports[1]} are closed"]
    return step


def run_demo(
    data_dir: Path | None = None, on_step: Callable[[Step], None] | None = None
) -> dict[str, Any]:
    """Tell the story; returns the transcript (``ok`` is true when every step went
    as expected). ``on_step`` sees each step as soon as it is done."""
    started = time.monotonic()
    report = on_step or (lambda step: None)
    folder, keep = _prepare(data_dir)
    try:
        keep_temp_files_beside(folder)
        passwords = {ANN: secrets.token_urlsafe(12), ANN_NEW: secrets.token_urlsafe(12)}
        users = tuple(UserSpec(email, pw) for email, pw in passwords.items())
        mail = MailSystemThread(
            MailserverSettings(
                data_dir=folder / "mail",
                smtp_port=0,
                imap_port=0,
                users=users,
                relay_senders=(CRM_FROM,),
            )
        ).start()
        try:
            settings = _settings(folder, mail.smtp_port)
            Threadsync.init(settings)
            environ = {PASSWORD_ENV[email]: pw for email, pw in passwords.items()}
            ts = Threadsync.from_settings(settings, environ=environ)
            try:
                steps = asyncio.run(_tell(ts, mail, passwords, report))
            finally:
                ts.close()
        finally:
            ports = (mail.smtp_port, mail.imap_port)
            mail.stop()
        final = _shutdown_step(len(steps) + 1, mail.host, ports)
        report(final)
        steps.append(final)
        if keep:
            (folder / "config.toml").write_text(
                _CONFIG.format(dir=folder, sub=SUB, crm=CRM_FROM), encoding="utf-8"
            )
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "ok": all(s.ok for s in steps),
        "duration_seconds": round(time.monotonic() - started, 2),
        "data_dir": str(folder),
        "kept": keep,
        "subaccount": SUB,
        "user": USER,
        "database": str(folder / "threadsync.db"),
        "steps": [s.as_json() for s in steps],
    }


def introduction() -> str:
    """The opening lines for people."""
    story = (
        f'Ann, user "{USER}" of the CRM sub-account {SUB}, has her own mailbox {ANN}. '
        f"Carla ({CARLA}) is a customer out in the world. A real mail system runs in this "
        "process, and the CRM's data is a throw-away SQLite database."
    )
    return "threadsync demo: the whole story, start to end, on this machine.\n" + (
        textwrap.fill(story, 88) + "\n"
    )


def summary(transcript: dict[str, Any]) -> str:
    """The closing lines for people."""
    failed = [s for s in transcript["steps"] if not s["ok"]]
    head = (
        f"all {len(transcript['steps'])} steps went as expected"
        if transcript["ok"]
        else f"{len(failed)} step(s) did not go as expected"
    )
    lines = [f"{head} ({transcript['duration_seconds']:.1f} s)."]
    if transcript["kept"]:
        folder = transcript["data_dir"]
        lines.append(f"The database and the mail are kept in {folder}; look around with")
        lines.append(f"  threadsync --config {folder}/config.toml threads {SUB}")
    else:
        lines.append("Its temporary data is gone; `threadsync demo --data-dir DIR` keeps it.")
    lines += [
        "",
        "To try it by hand: `threadsync mailserver --user you@example.test:secret` in one",
        "terminal, then in another `threadsync init`, `threadsync labs enable acme`,",
        "`threadsync connect ...` (the mailserver prints the options) and `threadsync run`.",
    ]
    return "\n".join(lines)
