"""Encrypts secrets at rest (R11) with a key kept in a file beside the config.

Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) is used rather than
hand-made crypto: it authenticates as well as encrypts, so a tampered or
wrong-key value is refused instead of decrypting to garbage. The key file is
created by ``threadsync init`` with mode 0600.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from threadsync.core.errors import ConfigError, SecretsUnreadable


class Vault:
    """Encrypts and decrypts the secrets of connections."""

    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
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

    @classmethod
    def from_file(cls, path: Path) -> Vault:
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            raise ConfigError(f"secret key file {path} is missing: run `threadsync init`") from None
        except OSError as exc:
            raise ConfigError(f"cannot read secret key file {path}: {exc.strerror}") from None
        return cls(key)

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
