"""``threadsync mailserver``: run the local mail system until Ctrl-C or SIGTERM.

:func:`run` is what the command calls: it starts the system on a fresh event
loop, reports where it listens, waits for SIGINT or SIGTERM and then closes
every listener and connection before returning, so nothing is left running.
:func:`describe` and :func:`describe_outside` are the texts for people.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from threadsync.core.errors import ConfigError
from threadsync.plugins.localmail.outside import OutsideMessage
from threadsync.plugins.localmail.settings import MailserverSettings
from threadsync.plugins.localmail.system import MailSystem


def keep_temp_files_beside(data_dir: Path) -> None:
    """Point this process's temporary folder into ``data_dir`` when the two are on
    different file systems: pymap renames its temporary files into the mail store.
    Only for processes that exist to run the mail system (the command, the demo)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if os.stat(tempfile.gettempdir()).st_dev != os.stat(data_dir).st_dev:
            tmp = data_dir / "tmp"
            tmp.mkdir(exist_ok=True)
            tempfile.tempdir = str(tmp)
    except OSError as exc:
        raise ConfigError(f"cannot use the mail folder {data_dir}: {exc.strerror or exc}") from None


async def serve(settings: MailserverSettings, on_ready: Callable[[dict[str, Any]], None]) -> None:
    """Start, call ``on_ready(info)``, wait for SIGINT/SIGTERM, stop."""
    system = MailSystem(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    await system.start()
    handled = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        info = system.info()
        info["pid"] = os.getpid()
        on_ready(info)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await system.stop()


def run(settings: MailserverSettings, on_ready: Callable[[dict[str, Any]], None]) -> None:
    """Run the mail system in this process until it is told to stop."""
    keep_temp_files_beside(settings.data_dir)
    asyncio.run(serve(settings, on_ready))


def describe(info: dict[str, Any], password: str | None = None) -> str:
    """What a person needs to use the running system; ``password`` is the first
    user's, as given to ``--user``, for the ``export MAILPW=...`` line."""
    host, smtp, imap = info["host"], info["smtp_port"], info["imap_port"]
    relay = ", ".join(info["relay_senders"]) or "nobody"
    users = ", ".join(info["users"]) or "none yet (start with --user ADDRESS:PASSWORD)"
    lines = [
        f"local mail system running (pid {info['pid']}); Ctrl-C or SIGTERM stops it",
        f"  SMTP   {host}:{smtp}  AUTH PLAIN/LOGIN, STARTTLS; relay without login for {relay}",
        f'  IMAP   {host}:{imap}  IDLE, UIDPLUS, STARTTLS; sent mail in the folder "Sent"',
        f"  users  {users}",
        f"  mail   {info['data_dir']}",
        "         mail to anyone else goes to the outside world: "
        "threadsync mailserver --list-outside",
        f"  TLS    CA certificate {info['ca_file']}",
    ]
    example = info["users"][0] if info["users"] else "ADDRESS"
    secret = shlex.quote(password) if password else f"'the password of {example}'"
    where = f"--smtp-port {smtp} --data-dir {shlex.quote(str(info['data_dir']))}"
    lines += [
        "",
        "try threadsync with it, in another terminal:",
        f"  export MAILPW={secret}",
        "  threadsync init && threadsync labs enable acme",
        f"  threadsync connect acme u1 --provider imap_smtp --email {example} \\",
        f"      --imap-host {host} --imap-port {imap} --smtp-host {host} --smtp-port {smtp} \\",
        "      --security none --password-env MAILPW",
        "  threadsync send acme u1 --to carla@customer.example --subject Hello --text Hi",
        "  threadsync mailserver reply --from carla@customer.example --text 'Thanks!' \\",
        f"      {where}",
        "      (the contact answers the newest message it received; "
        "--thread-of MESSAGE_ID for another)",
        "  threadsync run",
    ]
    return "\n".join(lines)


def describe_outside(messages: Sequence[OutsideMessage]) -> str:
    if not messages:
        return "the outside world has received nothing yet"
    lines = [f"{len(messages)} message(s) received by the outside world, oldest first:"]
    for m in messages:
        lines.append(f"  {m.date}  {m.envelope_from} -> {m.delivered_to}")
        lines.append(f"      {m.subject}  {m.message_id}  ({m.size} bytes)")
    return "\n".join(lines)
