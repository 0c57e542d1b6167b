"""Secrets at rest: the key file must be the owner's alone, the SQLite database
is created readable by its owner only, a lost key is never silently replaced
while ciphertext made with it remains, and ``rotate-key`` re-encrypts every
stored secret under a new key in one transaction (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.kernelfixtures import CONTACT, SUB, USER, World, make_settings, write_config
from threadsync.core.api import Threadsync
from threadsync.core.config import Settings
from threadsync.core.errors import ConfigError
from threadsync.core.host import webhooks
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, PendingSignIn, WebhookEndpoint, utcnow
from threadsync.core.store.vault import Vault

ROOT = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(config: Path, *args: str, expect: int) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(config), *args],
        cwd=config.parent, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'data' / 'threadsync.db'}", 2525)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    Threadsync.init(settings)
    key = settings.secret_key_file
    assert mode(key) == 0o600
    for loose in (0o640, 0o604, 0o644):
        key.chmod(loose)
        with pytest.raises(ConfigError) as caught:
            Threadsync.from_settings(settings)
        assert f"chmod 600 {key}" in str(caught.value)
        assert "readable" in str(caught.value)
    key.chmod(0o600)
    Threadsync.from_settings(settings).close()


def test_the_sqlite_database_is_created_for_its_owner_only(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    old = os.umask(0o022)
    try:
        Threadsync.init(settings)
    finally:
        os.umask(old)
    db = tmp_path / "data" / "threadsync.db"
    assert mode(db) == 0o600
    for sidecar in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if sidecar.exists():
            assert mode(sidecar) == 0o600, sidecar


def seal_sign_in(ts: Threadsync, flow: dict[str, str]) -> None:
    k = ts.kernel
    k.store.call(lambda s: s.add(PendingSignIn(
        id="si_rotate", subaccount_id=SUB, user_id=USER, provider="outlook",
        email="ann@contoso.test", purpose="connect", options={}, state_hash="0" * 64,
        flow=k.vault.seal(flow), consent_url="https://login.example/authorize",
        expires_at=utcnow() + timedelta(minutes=10),
    )))  # fmt: skip


def ciphertexts(ts: Threadsync) -> list[bytes]:
    def work(session: Any) -> list[bytes]:
        found = [*session.scalars(select(Connection.secrets)),
                 *session.scalars(select(PendingSignIn.flow)),
                 *session.scalars(select(WebhookEndpoint.secret))]  # fmt: skip
        return [c for c in found if c is not None]

    return ts.kernel.store.call(work)


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_lost_key_is_not_replaced_while_secrets_remain(world: World, tmp_path: Path) -> None:
    settings = world.ts.kernel.settings
    webhooks.create_endpoint(world.ts.kernel, SUB, "https://crm.example.com/hook")
    config = write_config(world, tmp_path / "config.toml")
    settings.secret_key_file.unlink()

    with pytest.raises(ConfigError) as caught:
        Threadsync.init(settings)
    assert "restore" in str(caught.value) and not settings.secret_key_file.exists()
    with pytest.raises(ConfigError) as caught:
        Threadsync.from_settings(settings)
    assert "threadsync init" not in str(caught.value) and "restore" in str(caught.value)
    err = cli(config, "init", expect=2).stderr
    assert "restore" in err and not settings.secret_key_file.exists()
    err = cli(config, "status", SUB, expect=2).stderr
    assert "threadsync init" not in err and "restore" in err


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_rotate_key_re_encrypts_every_secret(world: World, tmp_path: Path) -> None:
    ts = world.ts
    await world.connect()
    hook = webhooks.create_endpoint(ts.kernel, SUB, "https://crm.example.com/hook")
    seal_sign_in(ts, {"verifier": "pkce-verifier"})
    key_file = ts.kernel.settings.secret_key_file
    old_key = key_file.read_bytes()
    before = ciphertexts(ts)
    assert len(before) == 3

    config = write_config(world, tmp_path / "config.toml")
    result = json.loads(cli(config, "--json", "rotate-key", expect=0).stdout)
    assert result["re_encrypted"] == {"connections": 1, "sign_ins": 1, "webhook_endpoints": 1}

    new_key = key_file.read_bytes()
    assert new_key != old_key and mode(key_file) == 0o600
    after = ciphertexts(ts)
    assert len(after) == 3 and not set(after) & set(before)
    old, new = Vault(old_key.strip()), Vault(new_key.strip())
    for token in after:
        with pytest.raises(Exception, match="cannot be decrypted"):
            old.open(token)
    again = Threadsync.from_settings(ts.kernel.settings, environ=world.env)
    try:
        secrets = {c: again.kernel.vault.open(c) for c in after}
        assert {"secret": hook["secret"]} in secrets.values()
        assert {"verifier": "pkce-verifier"} in secrets.values()
        assert any(v.get("password") == world.password for v in secrets.values())
        # The connection still works with the re-encrypted password.
        await again.send(SUB, USER, Draft(to=[CONTACT], subject="after rotation", text="hi"))
        await again.run_once()
        (conn,) = again.status(SUB, USER)["connections"]
        assert conn["state"] == "connected" and conn["last_error"] is None
    finally:
        await again.aclose()
    assert new.open(after[0])  # the key file holds the new key alone now
    assert Fernet(new_key.strip())
