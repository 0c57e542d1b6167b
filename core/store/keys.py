"""The secret key's life: made once, never silently replaced, rotated on demand.

Every column that holds ciphertext is listed in :data:`ENCRYPTED`. A new key is
made only while none of them holds anything (:func:`ensure_key`): a key made
after the old one was lost could not decrypt what is stored, and would hide
that the old one is needed. :func:`open_vault` says so too when the key file is
missing.

:func:`rotate` re-encrypts every stored secret under a new key in one
transaction. The key file holds the new and the old key while it runs (the
first encrypts, both decrypt), so whether the process dies before, during or
after the transaction, the file decrypts everything in the database; the old
key is dropped from the file only after the commit. Processes that already run
keep the old key in memory: stop them before rotating.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session

from threadsync.core.errors import ConfigError, StoreError
from threadsync.core.store.database import Store
from threadsync.core.store.models import Connection, PendingSignIn, WebhookEndpoint
from threadsync.core.store.vault import KeyFileMissing, Vault

#: Every encrypted column: (name in reports, model, column).
ENCRYPTED: tuple[tuple[str, Any, InstrumentedAttribute[Any]], ...] = (
    ("connections", Connection, Connection.secrets),
    ("sign_ins", PendingSignIn, PendingSignIn.flow),
    ("webhook_endpoints", WebhookEndpoint, WebhookEndpoint.secret),
)


def encrypted_count(store: Store) -> int:
    """How many stored values are encrypted; 0 for a database without tables."""

    def work(session: Session) -> int:
        return sum(
            int(session.scalar(select(func.count()).where(column.is_not(None))) or 0)
            for _, _, column in ENCRYPTED
        )

    try:
        return store.call(work)
    except (StoreError, SQLAlchemyError):  # not initialised yet: nothing is stored
        return 0


def _lost(path: Path, count: int) -> ConfigError:
    return ConfigError(
        f"secret key file {path} is missing, but the database holds {count} secrets "
        f"encrypted with it: restore the key file from a backup (a new key cannot "
        f"decrypt them, so none is made)"
    )


def open_vault(store: Store, path: Path) -> Vault:
    """The vault of the key file at ``path``; when the file is missing, the error
    says to restore it if anything was encrypted with it, else to run init."""
    try:
        return Vault.from_file(path)
    except KeyFileMissing:
        count = encrypted_count(store)
        store.dispose()  # the caller fails to start: leave no connection open
        if count:
            raise _lost(path, count) from None
        raise


def ensure_key(store: Store, path: Path) -> bool:
    """Make the key file unless it exists; True if made. Refuses while secrets
    encrypted with a lost key remain. An existing file is checked (readable by
    its owner only, a valid key)."""
    if path.exists():
        Vault.from_file(path)
        return False
    count = encrypted_count(store)
    if count:
        raise _lost(path, count)
    return Vault.create_key_file(path)


def _write_keys(path: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically (a new file, mode 0600, renamed over it)."""
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"".join(k + b"\n" for k in keys))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def rotate(store: Store, path: Path) -> dict[str, Any]:
    """Re-encrypt every stored secret under a new key, in one transaction, and
    keep only the new key. Nothing changes if any value cannot be decrypted."""
    store.check_ready()
    old = Vault.read_keys(path)
    new = Fernet.generate_key()
    _write_keys(path, [new, *old])
    vault = Vault(new, *old)

    def work(session: Session) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, model, column in ENCRYPTED:
            rows = session.scalars(select(model).where(column.is_not(None)).with_for_update()).all()
            for row in rows:
                setattr(row, column.key, vault.rotate(getattr(row, column.key)))
            counts[name] = len(rows)
        return counts

    try:
        counts = store.call(work)
    except BaseException:
        _write_keys(path, old)  # the database still holds the old ciphertext
        raise
    _write_keys(path, [new])
    return {
        "secret_key_file": str(path),
        "re_encrypted": counts,
        "total": sum(counts.values()),
    }
