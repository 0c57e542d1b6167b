"""threadsync's command line: parse, call the kernel, print (text or ``--json``).

Thin on purpose: every rule lives in ``core``. Errors from the kernel become a
one-line message on stderr and a non-zero exit status, never a traceback.
``threadsync`` and ``python cli.py`` are the same program.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import mimetypes
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import pluggy

from threadsync.cliconnect import ProviderCommand
from threadsync.cliglobals import hoist_global_options, setup_logging
from threadsync.core.config import Settings, check_sections, default_config_path, load
from threadsync.core.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    ProviderError,
    Refused,
    StoreError,
    ThreadsyncError,
)

T = TypeVar("T")


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager of this command-line process (built once)."""
    from threadsync.core.registry import get_plugin_manager

    return get_plugin_manager()

EXIT_CODES: list[tuple[type[ThreadsyncError], int]] = [
    (InvalidInput, 2),
    (ConfigError, 2),
    (NotFound, 3),
    (Refused, 4),
    (ProviderError, 5),
    (StoreError, 6),
    (ThreadsyncError, 1),
]


class Ctx:
    """What every command shares: the config path and the output mode."""

    def __init__(self, config: Path, as_json: bool) -> None:
        self.config = config
        self.as_json = as_json
        self._settings: Settings | None = None
        self._ts: Any = None

    @property
    def settings(self) -> Settings:
        """The config file, checked; sections of plugins against what they declare."""
        if self._settings is None:
            from threadsync.core.registry import config_sections

            settings = load(self.config)
            check_sections(settings, config_sections(plugin_manager()))
            self._settings = settings
        return self._settings

    def threadsync(self) -> Any:
        from threadsync.core.api import Threadsync

        if self._ts is None:
            _check_database_file(self.settings.database_url)
            self._ts = Threadsync.from_settings(self.settings)
            self._ts.check_ready()
        return self._ts

    def run(self, call: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run one API coroutine, then log out of the mailbox sessions it opened."""
        ts = self.threadsync()

        async def go() -> T:
            try:
                return await call(ts)
            finally:
                await ts.close_sessions()

        return asyncio.run(go())

    def emit(self, data: Any, text: Callable[[Any], str] | str | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
        elif callable(text):
            click.echo(text(data))
        elif text is not None:
            click.echo(text)
        else:
            click.echo(json.dumps(data, indent=2, default=str))


def _check_database_file(url: str) -> None:
    """A SQLite file that is not there is not made here (connecting would make an
    empty one): only ``init`` creates the database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or name in ("", ":memory:"):
        return
    if name.startswith("file:"):
        return  # a SQLite URI: its own rules
    if not Path(name).exists():
        raise StoreError(f"the database file {name} does not exist: run `threadsync init`")


def fail(ctx: Ctx | None, exc: ThreadsyncError) -> NoReturn:
    code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
    if ctx is not None and ctx.as_json:
        click.echo(json.dumps({"error": {"code": exc.code, "message": str(exc)}}), err=True)
    else:
        click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---- the group --------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default ./config.toml, or $THREADSYNC_CONFIG).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Log lines on stderr as text, or one JSON object per line.",
)
@click.pass_context
def cli(
    click_ctx: click.Context,
    config_path: Path | None,
    as_json: bool,
    verbose: int,
    log_format: str,
) -> None:
    """threadsync: two-way email sync between a CRM and users' own mailboxes.

    The global options may be written before or after the command name."""
    setup_logging(verbose, log_format)
    click_ctx.obj = Ctx(config_path or default_config_path(), as_json)


pass_ctx = click.make_pass_decorator(Ctx)


@cli.command()
@pass_ctx
def init(ctx: Ctx) -> None:
    """Create or upgrade the database and the secret key; idempotent."""
    from threadsync.core.api import Threadsync

    result = Threadsync.init(ctx.settings)
    ctx.emit(
        result,
        lambda r: (
            f"database ready (schema {r['revision']}); secret key "
            + ("created" if r["secret_key_created"] else "kept")
            + f" at {r['secret_key_file']}"
        ),
    )


@cli.command("rotate-key")
@pass_ctx
def rotate_key(ctx: Ctx) -> None:
    """Re-encrypt every stored secret under a new secret key, in one transaction.

    Stop the daemon and the API first: they hold the old key in memory."""
    from threadsync.core.api import Threadsync

    ctx.emit(
        Threadsync.rotate_key(ctx.settings),
        lambda r: f"secret key rotated at {r['secret_key_file']}; "
        f"{r['total']} stored secrets re-encrypted",
    )


# ---- Labs ---------------------------------------------------------------------------


@cli.group()
def labs() -> None:
    """The per-sub-account Labs flag two_way_email_sync."""


def _labs_text(r: dict[str, Any]) -> str:
    state = "on" if r["two_way_email_sync"] else "off"
    return f"{r['subaccount']}: two_way_email_sync is {state}"


@labs.command("enable")
@click.argument("subaccount")
@pass_ctx
def labs_enable(ctx: Ctx, subaccount: str) -> None:
    """Turn two-way email sync on for SUBACCOUNT."""
    ctx.emit(ctx.threadsync().labs(subaccount, enabled=True), _labs_text)


@labs.command("disable")
@click.argument("subaccount")
@pass_ctx
def labs_disable(ctx: Ctx, subaccount: str) -> None:
    """Turn it off: every connection of SUBACCOUNT pauses."""
    ctx.emit(ctx.threadsync().labs(subaccount, enabled=False), _labs_text)


@labs.command("status")
@click.argument("subaccount")
@pass_ctx
def labs_status(ctx: Ctx, subaccount: str) -> None:
    """Show the flag of SUBACCOUNT."""
    ctx.emit(ctx.threadsync().labs_status(subaccount), _labs_text)


# ---- connections ----------------------------------------------------------------------


def _connection_text(c: dict[str, Any]) -> str:
    paused = " (paused: Labs off)" if c.get("paused") else ""
    err = f" - {c['last_error']}" if c.get("last_error") else ""
    who = f"{c['subaccount']}/{c['user']}"
    held = f" (worker {c['worker']})" if c.get("worker") else ""
    return f"{who}: {c['email']} via {c['provider']} is {c['state']}{paused}{held}{err}"


def _provider_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _connect_command(name: str, doc: str, update: bool) -> ProviderCommand:
    @click.argument("subaccount")
    @click.argument("user")
    @click.option("--provider", required=True, help="Provider name (see `threadsync plugins`).")
    @click.option("--email", required=True, help="The mailbox address to connect.")
    @pass_ctx
    def command(
        ctx: Ctx, /, subaccount: str, user: str, provider: str, email: str, **kw: Any
    ) -> None:
        options = _provider_options(kw)
        current = click.get_current_context().command
        assert isinstance(current, ProviderCommand)
        current.check_options(provider, options)
        ts = ctx.threadsync()
        fn = ts.update_email if update else ts.connect
        result = run_async(
            fn(
                subaccount,
                user,
                provider,
                email=email,
                options=options,
                notify=lambda text: click.echo(text, err=True),
            )
        )
        ctx.emit(result, _connection_text)

    command.__doc__ = doc
    made = click.command(name, cls=ProviderCommand)(command)
    assert isinstance(made, ProviderCommand)
    return made


# ---- mail ---------------------------------------------------------------------------


def _read_text(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc}") from None


def _attachments(paths: tuple[Path, ...]) -> list[Any]:
    from threadsync.core.mime import AttachmentIn

    out = []
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read attachment {p}: {exc.strerror}") from None
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        out.append(AttachmentIn(filename=p.name, content_type=ctype, data=data))
    return out


def _body(text: str | None, text_file: Path | None) -> str:
    if (text is None) == (text_file is None):
        raise InvalidInput("give exactly one of --text and --text-file")
    return text if text is not None else (_read_text(text_file, "text file") or "")


def _send_text(r: dict[str, Any]) -> str:
    how = (
        "through the user's mailbox" if r["channel"] == "mailbox" else "through the default channel"
    )
    sync = "synced" if r["synced"] else f"not synced ({r['reason']})"
    text = f"{r['status']} {how}; this message {sync}; message {r['message_id']}"
    text += f" in thread {r['thread_id']}"
    if r.get("subaccount_known") is False:
        text += (
            f"\nnote: sub-account {r['subaccount']!r} was unknown to threadsync until now "
            "(no Labs flag set, no mail sent for it): check its spelling"
        )
    return text


def _finish_send(ctx: Ctx, result: dict[str, Any], require_sync: bool) -> None:
    """Print the outcome; with ``--require-sync`` a message that did not sync is exit 4."""
    ctx.emit(result, _send_text)
    if require_sync and not result["synced"]:
        fail(ctx, Refused(f"the message did not sync ({result['reason']}); --require-sync"))


_require_sync = click.option(
    "--require-sync",
    is_flag=True,
    help="Exit 4 when the message does not sync (it still goes as routed; "
    "the --json field `synced` says the same).",
)


_body_options = [
    click.option("--text", default=None, help="Plain-text body."),
    click.option("--text-file", type=click.Path(dir_okay=False, path_type=Path), default=None),
    click.option("--html-file", type=click.Path(dir_okay=False, path_type=Path), default=None),
    click.option(
        "--attach",
        multiple=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="File to attach.",
    ),
]


def body_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_body_options):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("subaccount")
@click.argument("user")
@click.option("--to", "to", multiple=True, required=True, help="Recipient (repeatable).")
@click.option("--cc", "cc", multiple=True, help="Copy recipient (repeatable).")
@click.option("--subject", required=True)
@body_options
@_require_sync
@pass_ctx
def send(
    ctx: Ctx,
    subaccount: str,
    user: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    subject: str,
    text: str | None,
    text_file: Path | None,
    html_file: Path | None,
    attach: tuple[Path, ...],
    require_sync: bool,
) -> None:
    """Send a new email from the CRM; through the user's mailbox when possible.

    Exit 0 whichever channel it took (see `synced` and `reason`), unless
    --require-sync. A sub-account threadsync never saw is noted (a typo?)."""
    from threadsync.core.host.views import subaccount_known
    from threadsync.core.outbox.compose import Draft

    draft = Draft(
        text=_body(text, text_file),
        html=_read_text(html_file, "html file"),
        attachments=_attachments(attach),
        to=list(to),
        cc=list(cc),
        subject=subject,
    )
    known = subaccount_known(ctx.threadsync().kernel, subaccount)
    result = ctx.run(lambda ts: ts.send(subaccount, user, draft))
    _finish_send(ctx, {**result, "subaccount": subaccount, "subaccount_known": known}, require_sync)


@cli.command()
@click.argument("thread_id")
@body_options
@_require_sync
@pass_ctx
def reply(
    ctx: Ctx,
    thread_id: str,
    text: str | None,
    text_file: Path | None,
    html_file: Path | None,
    attach: tuple[Path, ...],
    require_sync: bool,
) -> None:
    """Reply from the CRM in THREAD_ID."""
    from threadsync.core.outbox.compose import Draft

    draft = Draft(
        text=_body(text, text_file),
        html=_read_text(html_file, "html file"),
        attachments=_attachments(attach),
    )
    _finish_send(ctx, ctx.run(lambda ts: ts.reply(thread_id, draft)), require_sync)


@cli.command()
@click.argument("subaccount")
@click.argument("user", required=False)
@pass_ctx
def status(ctx: Ctx, subaccount: str, user: str | None) -> None:
    """Connections of SUBACCOUNT (or of one USER), past ones included."""
    result = ctx.threadsync().status(subaccount, user)
    ctx.emit(
        result,
        lambda r: "\n".join(_connection_text(c) for c in r["connections"]) or "no connections",
    )


@cli.command()
@click.argument("subaccount")
@click.argument("user")
@pass_ctx
def disconnect(ctx: Ctx, subaccount: str, user: str) -> None:
    """Disconnect USER's mailbox: its threads stop syncing for good."""
    ctx.emit(run_async(ctx.threadsync().disconnect(subaccount, user)), _connection_text)


@cli.command()
@click.argument("subaccount")
@click.argument("user", required=False)
@pass_ctx
def threads(ctx: Ctx, subaccount: str, user: str | None) -> None:
    """Threads of SUBACCOUNT (or of one USER)."""

    def text(r: dict[str, Any]) -> str:
        lines = [
            f"{t['thread_id']}  {t['state']:<8} {t['message_count']:>3} msg  {t['subject']}"
            + (f"  ({t['stop_reason']})" if t["stop_reason"] else "")
            for t in r["threads"]
        ]
        return "\n".join(lines) or "no threads"

    ctx.emit(ctx.threadsync().threads(subaccount, user), text)


@cli.command()
@click.argument("thread_id")
@pass_ctx
def thread(ctx: Ctx, thread_id: str) -> None:
    """One thread with all its messages."""

    def text(r: dict[str, Any]) -> str:
        head = f"{r['thread_id']} [{r['state']}] {r['subject']}"
        lines = [head]
        for m in r["messages"]:
            arrow = "<-" if m["direction"] == "inbound" else "->"
            state = m["state"] + (f" ({m['reason']})" if m["reason"] else "")
            date = m["date"] or f"(no Date header; arrived {m.get('received_at')} UTC)"
            lines.append(f"  {arrow} {m['from']} ({m['origin']}) {date}: {m['subject']} [{state}]")
            for a in m["attachments"]:
                lines.append(f"     attachment {a['filename']} {a['size']} bytes")
            if m.get("defects"):
                lines.append(
                    f"     parts of this message could not be read ({len(m['defects'])} "
                    f"note(s)): {m['defects'][0]}"
                )
        return "\n".join(lines)

    ctx.emit(ctx.threadsync().thread(thread_id), text)


@cli.command()
@click.option("--once", is_flag=True, help="One full pass, then exit 0.")
@pass_ctx
def run(ctx: Ctx, /, once: bool, **options: Any) -> None:
    """The daemon: sync every connection until stopped (SIGTERM, Ctrl-C).

    Plugins add options and services (the HTTP API adds --listen)."""
    ts = ctx.threadsync()
    if once:
        report = run_async(ts.run_once())
        data = {
            "connections": report.connections,
            "stored": report.stored,
            "skipped": report.skipped,
            "duplicates": report.duplicates,
            "sent": report.sent,
            "errors": report.errors,
        }
        ctx.emit(
            data,
            lambda d: (
                f"pass done: {d['connections']} connection(s), {d['stored']} stored, "
                f"{d['skipped']} skipped, {d['sent']} sent"
                + "".join(f"\n  {e}" for e in d["errors"])
            ),
        )
        return
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)

    def announce(info: dict[str, Any]) -> None:
        if ctx.as_json:
            click.echo(json.dumps(info))
        else:
            click.echo("\n".join(f"{key}: {value}" for key, value in info.items()))

    async def main() -> None:
        services = ts.daemon_services({**options, "announce": announce})
        daemon = ts.daemon(extra=services)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, daemon.stop)
        logging.getLogger("threadsync").info("daemon started (pid %d)", os.getpid())
        await daemon.run()

    run_async(main())


@cli.command()
@pass_ctx
def workers(ctx: Ctx) -> None:
    """The running daemons sharing the connections, their heartbeat and share."""

    def text(r: dict[str, Any]) -> str:
        lines = [
            f"{w['id']:<32} {'live' if w['live'] else 'gone':<5} "
            f"heartbeat {w['heartbeat_age_seconds']:>6.1f} s ago  "
            f"{w['connections']:>5} connection(s)"
            for w in r["workers"]
        ]
        return "\n".join(lines) or "no workers"

    ctx.emit(ctx.threadsync().workers(), text)


@cli.command()
@pass_ctx
def plugins(ctx: Ctx) -> None:
    """Registered providers and the plugin that gave each."""
    from threadsync.core.registry import providers

    found = providers(plugin_manager())
    data = {
        "providers": [
            {"name": p.name, "plugin": p.plugin, "title": p.cls.title} for p in found.values()
        ]
    }
    ctx.emit(
        data,
        lambda d: "\n".join(
            f"{p['name']:<12} from {p['plugin']}: {p['title']}" for p in d["providers"]
        ),
    )


# ---- entry point --------------------------------------------------------------------


def build() -> click.Group:
    """Attach connect/update-email with every registered provider's options, then
    the commands plugins add (``register_commands``)."""
    from threadsync.core.registry import providers

    pm = plugin_manager()
    found = providers(pm)
    for name, doc, update in (
        ("connect", "Connect USER's mailbox (Labs must be on).", False),
        ("update-email", "Replace USER's connected address without a gap.", True),
    ):
        command = _connect_command(name, doc, update)
        command.add_providers(found)
        cli.add_command(command)
    pm.hook.register_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turns threadsync errors into messages and exit codes."""
    try:
        group = build()
    except ThreadsyncError as exc:
        fail(None, exc)
    args = hoist_global_options(group, sys.argv[1:] if argv is None else argv)
    try:
        group.main(args=args, prog_name="threadsync", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ThreadsyncError as exc:
        fail(_ctx_from_argv(args), exc)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last line of defence: no traceback reaches a user
        logging.getLogger("threadsync").debug("internal error", exc_info=True)
        click.echo(f"internal error: {exc.__class__.__name__}: {exc}", err=True)
        sys.exit(70)


def _ctx_from_argv(args: list[str]) -> Ctx:
    """The output mode of ``args`` (global options already in front)."""
    as_json = False
    tokens = iter(args)
    for token in tokens:
        if token in ("--config", "--log-format"):
            next(tokens, None)
        elif token == "--json":
            as_json = True
        elif not token.startswith("-"):
            break
    return Ctx(default_config_path(), as_json)


if __name__ == "__main__":
    # Run the installed module, not this file as ``__main__``: plugins that add
    # commands import ``threadsync.cli``, and there must be one copy of it.
    from threadsync.cli import main as _main

    _main()
