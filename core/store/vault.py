"""Encrypts secrets at rest (R11) with a key kept in a file beside the config.

Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) is used rather than
hand-made crypto: it authenticates as well as encrypts, so a tampered or
wrong-key value is refused instead of decrypting to garbage. The key file is
created by ``threadsync init`` with mode 0600, and a key file that other users
can read is refused. The file holds one key per line: the first encrypts, all
decrypt (only while ``threadsync rotate-key`` runs does it hold two, see
:mod:`threadsync.core.store.keys`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from threadsync.core.errors import ConfigError, SecretsUnreadable


class KeyFileMissing(ConfigError):
    """The secret key file does not exist."""


class Vault:
    """Encrypts and decrypts the secrets of connections: with ``key``; ``older``
    keys only decrypt."""

    def __init__(self, key: bytes, *older: bytes) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k) for k in (key, *older)])
        except (ValueError, TypeError):
            raise ConfigError("the secret key file does not hold a valid key") from None

    @classmethod
    def create_key_file(cls, path: Path) -> bool:
        """Write a new key to ``path`` (mode 0600) unless it exists. True if made."""
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(Fernet.generate_key() + b"\n")
        return True

    @staticmethod
    def read_keys(path: Path) -> list[bytes]:
        """The keys in ``path``, newest first; refuses a file others may read."""
        try:
            mode = path.stat().st_mode
            keys = path.read_bytes().split()
        except FileNotFoundError:
            raise KeyFileMissing(
                f"secret key file {path} is missing: run `threadsync init`"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read secret key file {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise ConfigError(
                f"secret key file {path} is readable by other users (mode "
                f"{mode & 0o777:04o}); it must be the owner's alone: run `chmod 600 {path}`"
            )
        if not keys:
            raise ConfigError("the secret key file does not hold a valid key")
        return keys

    @classmethod
    def from_file(cls, path: Path) -> Vault:
        return cls(*cls.read_keys(path))

    def rotate(self, token: bytes) -> bytes:
        """``token`` encrypted again under the first key."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken:
            raise SecretsUnreadable(
                "stored credentials cannot be decrypted with this secret key"
            ) from None

    def seal(self, secrets: dict[str, str]) -> bytes:
        return self._fernet.encrypt(json.dumps(secrets, sort_keys=True).encode())

    def open(self, token: bytes | None) -> dict[str, str]:
        if token is None:
            return {}
        try:
            value = json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise SecretsUnreadable(
                "stored credentials cannot be decrypted with this secret key"
            ) from None
        if not isinstance(value, dict):
            raise SecretsUnreadable("stored credentials are damaged")
        return {str(k): str(v) for k, v in value.items()}
