"""What the local mail system plugin adds to threadsync through hooks: its config
section (``[mailserver]``) and the ``mailserver`` (with ``mailserver reply``, a contact
answering) and ``demo`` commands."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import click

from threadsync.cli import Ctx, pass_ctx
from threadsync.core.errors import ThreadsyncError
from threadsync.core.hookspecs import hookimpl

#: The keys of ``[mailserver]`` (see :mod:`.settings`).
MAILSERVER_KEYS = ("data_dir", "host", "smtp_port", "imap_port", "users", "relay_senders")


@hookimpl
def config_sections() -> Mapping[str, Collection[str]]:
    return {"mailserver": MAILSERVER_KEYS}


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(mailserver)
    cli.add_command(demo)


@click.group(invoke_without_command=True)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="ADDRESS:PASSWORD",
    help="Create a mailbox or set its password (repeatable); kept, hashed.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the mail is kept (default: [mailserver] data_dir, var/mail).",
)
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option(
    "--smtp-port",
    type=int,
    default=None,
    help="SMTP port (default: the [outbound.default] port, 2525; 0 = any free).",
)
@click.option("--imap-port", type=int, default=None, help="IMAP port (default 1143; 0 = any).")
@click.option(
    "--list-outside", is_flag=True, help="List what the outside world received, then exit."
)
@click.pass_context
def mailserver(
    click_ctx: click.Context,
    users: tuple[str, ...],
    data_dir: Path | None,
    host: str | None,
    smtp_port: int | None,
    imap_port: int | None,
    list_outside: bool,
) -> None:
    """A local mail system (SMTP + IMAP) for trying threadsync out and for tests.

    Without a subcommand it runs until Ctrl-C; `threadsync mailserver reply`
    makes a contact in its outside world answer a message."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx = click_ctx.find_object(Ctx)
    assert ctx is not None
    from threadsync.plugins.localmail import serve
    from threadsync.plugins.localmail.outside import list_outside as outside_messages
    from threadsync.plugins.localmail.settings import for_command

    config = for_command(
        ctx.settings,
        os.environ,
        users=users,
        data_dir=data_dir,
        host=host,
        smtp_port=smtp_port,
        imap_port=imap_port,
    )
    if list_outside:
        found = outside_messages(config.outside_dir)
        ctx.emit({"messages": [m.as_json() for m in found]}, serve.describe_outside(found))
        return
    from threadsync.plugins.localmail.settings import parse_user

    password = parse_user(users[0]).password if users else None

    def ready(info: dict[str, Any]) -> None:
        click.echo(json.dumps(info) if ctx.as_json else serve.describe(info, password))

    serve.run(config, ready)
    if not ctx.as_json:
        click.echo("local mail system stopped")


@mailserver.command("reply")
@click.option("--from", "sender", required=True, help="The contact who answers.")
@click.option("--to", default=None, help="Whom to (default: the From of the message).")
@click.option(
    "--thread-of",
    "parent",
    default=None,
    metavar="MESSAGE_ID",
    help="The Message-ID of the message answered, as `send` printed it (default: "
    "the newest message the contact received).",
)
@click.option("--text", required=True, help="The reply's text.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--host", default=None, help="Where the mail system listens.")
@click.option("--smtp-port", type=int, default=None, help="Its SMTP port.")
@pass_ctx
def mailserver_reply(
    ctx: Ctx,
    sender: str,
    to: str | None,
    parent: str | None,
    text: str,
    data_dir: Path | None,
    host: str | None,
    smtp_port: int | None,
) -> None:
    """A contact of the outside world answers MESSAGE_ID (In-Reply-To set), over SMTP
    to the running mail system: what a contact's mail program does."""
    from threadsync.plugins.localmail.contact import reply
    from threadsync.plugins.localmail.settings import for_command

    config = for_command(
        ctx.settings, os.environ, data_dir=data_dir, host=host, smtp_port=smtp_port
    )
    sent = reply(config, sender, to, parent, text)
    ctx.emit(sent, lambda r: f"{r['from']} replied to {r['to']}: {r['subject']} {r['message_id']}")


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's database and mail in this new folder (default: a "
    "temporary folder, removed at the end).",
)
@pass_ctx
def demo(ctx: Ctx, data_dir: Path | None) -> None:
    """The whole story on the embedded defaults, against a local mail system."""
    from threadsync.plugins.localmail.demo import introduction, render_step, run_demo, summary

    if not ctx.as_json:
        click.echo(introduction())
    transcript = run_demo(data_dir, None if ctx.as_json else lambda s: click.echo(render_step(s)))
    ctx.emit(transcript, summary)
    if not transcript["ok"]:
        raise ThreadsyncError("the demo did not go as expected (see the steps above)")
