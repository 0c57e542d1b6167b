"""What the HTTP API plugin adds to threadsync through hooks: its config sections
(``[http]``, ``[webhooks]``), the ``apikey`` commands, ``run --listen`` and the
API server and webhook dispatcher that ``run`` starts beside the sync loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import fields
from typing import Any

import click

from threadsync.cli import Ctx, pass_ctx
from threadsync.core.errors import InvalidInput
from threadsync.core.hookspecs import hookimpl
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.plugins.http_api.settings import HttpSettings, http_settings

log = logging.getLogger("threadsync")


@hookimpl
def config_sections() -> Mapping[str, Collection[str]]:
    http = {f.name for f in fields(HttpSettings)} - {"webhooks"}
    webhooks = {f.name for f in fields(WebhookSettings)} - {"idempotency_hours"}
    return {"http": [*http, "idempotency_hours"], "webhooks": sorted(webhooks)}


@hookimpl
def daemon_services(
    threadsync: Any, options: Mapping[str, Any]
) -> list[Callable[[], Awaitable[None]]]:
    """The API and the webhook dispatcher, when ``--listen`` or ``[http] listen``
    names an address."""
    listen = options.get("listen")
    if listen is None and not threadsync.settings.section("http").get("listen"):
        return []
    from threadsync.plugins.http_api.server import Service

    service = Service.prepare(threadsync, http_settings(threadsync.settings, listen))
    log.info("HTTP API on %s", service.address)
    announce = options.get("announce")
    if callable(announce):
        announce({"listening": service.address})
    return service.coroutines()


@hookimpl
def register_commands(cli: click.Group) -> None:
    run = cli.commands["run"]
    run.params.append(
        click.Option(
            ["--listen"],
            metavar="HOST:PORT",
            default=None,
            help="Also serve the HTTP API and deliver webhooks here (default: [http] "
            "listen; off when neither is set).",
        )
    )
    cli.add_command(apikey)


@click.group()
def apikey() -> None:
    """API keys of the HTTP API: one per sub-account, or an admin key for operators."""


@apikey.command("create")
@click.argument("subaccount", required=False)
@click.option("--admin", is_flag=True, help="An operator key that reaches every sub-account.")
@click.option("--label", default="", help="A note for people (who uses the key).")
@pass_ctx
def apikey_create(ctx: Ctx, subaccount: str | None, admin: bool, label: str) -> None:
    """Make a key for SUBACCOUNT (or --admin). The key is shown once; only its hash is kept."""
    if admin == (subaccount is not None):
        raise InvalidInput("give a SUBACCOUNT, or --admin for an operator key (not both)")
    made = ctx.threadsync().api_keys.create(subaccount, label)
    ctx.emit(
        made,
        lambda r: (
            f"{r['key']}\n(key id {r['key_id']}, "
            + ("admin" if r["admin"] else f"sub-account {r['subaccount']}")
            + "; shown only now: keep it in the CRM's secret store)"
        ),
    )


@apikey.command("list")
@click.argument("subaccount", required=False)
@pass_ctx
def apikey_list(ctx: Ctx, subaccount: str | None) -> None:
    """Keys (all, or SUBACCOUNT's), revoked ones too; never the keys themselves."""
    result = ctx.threadsync().api_keys.list_keys(subaccount)
    ctx.emit(
        result,
        lambda r: (
            "\n".join(
                f"{k['key_id']}  {'admin' if k['admin'] else k['subaccount']}"
                + ("  revoked" if k["revoked_at"] else "")
                + (f"  {k['label']}" if k["label"] else "")
                for k in r["keys"]
            )
            or "no API keys"
        ),
    )


@apikey.command("revoke")
@click.argument("key_id")
@pass_ctx
def apikey_revoke(ctx: Ctx, key_id: str) -> None:
    """Revoke the key KEY_ID (as listed); it stops working within seconds."""
    result = ctx.threadsync().api_keys.revoke(key_id)
    ctx.emit(result, lambda r: f"API key {r['key_id']} revoked")
