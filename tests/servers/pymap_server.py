"""A pymap (pure-Python IMAP server) instance for tests.

The fallback when Dovecot is not installed. :class:`PymapServer` runs
``pymap ... maildir DIR`` in a child Python process on a free loopback port
with the test CA's certificate for STARTTLS. Users live in pymap's own
``pymap-etc-passwd``/``pymap-etc-shadow`` files (written directly, with
low-round PBKDF2 hashes so logins stay fast); mail in Maildir++ folders with
Dovecot-compatible ``dovecot-uidlist`` files, which ``deliver``,
``messages``, ``flags`` and ``reset_uidvalidity`` use without an IMAP session.

Limits and quirks compared with Dovecot (tests should branch on
``supports_condstore``/``tls_port`` or skip):

* no CONDSTORE, QRESYNC, ENABLE, THREAD, SORT, SPECIAL-USE: ``Sent`` exists
  and is subscribed, but LIST shows no ``\\Sent`` attribute, so clients must
  fall back to the folder name;
* TLS only via STARTTLS (``tls_port`` is None), and LOGIN is accepted before
  STARTTLS;
* messages come back with bare LF line endings (``BODY[]`` as well as
  ``BODY[HEADER.FIELDS ...]``), and APPENDed messages are stored with LF, so
  ``messages()`` returns them with LF; ``deliver`` stores bytes as given;
* keywords are limited to those listed in each folder's ``dovecot-keywords``
  file; :data:`KEYWORDS` are pre-defined in INBOX, Sent and folders made by
  ``deliver``, any other keyword in a STORE is silently dropped;
* changes made behind its back (``deliver``) reach a selected/IDLE session on
  its next poll, within about a second;
* ``reset_uidvalidity`` rewrites the UIDVALIDITY in ``dovecot-uidlist``
  (UIDs stay); sessions opened afterwards see the new value, an already
  selected session is not told;
* non-ASCII folder names are stored as given, not in modified UTF-7.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from . import (
    ServerStartError,
    die_with_parent_prefix,
    free_port,
    log_tail,
    maildir_folder_path,
    port_is_open,
    read_maildir_flags,
    read_maildir_messages,
    wait_for_greeting,
)
from .tlscerts import TestCA

__all__ = ["KEYWORDS", "PymapServer"]

#: Keywords usable in STORE on pymap (it cannot create keywords on the fly).
KEYWORDS = ("$Forwarded", "$MDNSent", "$Junk", "$NotJunk", "$Phishing", "$Important")

_START_ATTEMPTS = 3
_LOCK_TIMEOUT = 10.0
_HASH_ROUNDS = 1000  # pymap reads the round count from each stored hash

_RUN_PYMAP = "import sys; from pymap.main import main; sys.argv[0] = 'pymap'; main()"


def _check_email(email: str) -> None:
    if not email or any(c in email for c in ":/\\\r\n\t ") or email.startswith("."):
        raise ValueError(f"unsupported e-mail address for the test pymap: {email!r}")


class PymapServer:
    """A running (after :meth:`start`) pymap maildir server."""

    kind = "pymap"
    supports_condstore = False
    supports_idle = True

    def __init__(self, workdir: Path, ca: TestCA, *, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.ca = ca
        self.host = host
        self.port = 0
        self.tls_port: int | None = None
        self.root = self.workdir / "pymap"
        self._users: dict[str, str] = {}
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._counter = 0

    # ------------------------------------------------------------------ paths

    @property
    def log_file(self) -> Path:
        return self.root / "pymap.log"

    def maildir(self, email: str) -> Path:
        """The root Maildir (INBOX) of a user."""
        return self.root / "users" / email.lower()

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 20.0) -> PymapServer:
        """Start pymap and wait for its greeting; returns self.

        After :meth:`stop`, ``start`` brings it back on the same port with the
        same users and mail.
        """
        with self._lock:
            if self._process is not None:
                return self
            try:
                import pymap  # noqa: F401
            except ImportError as exc:
                raise ServerStartError("pymap is not installed") from exc
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "users").mkdir(exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            self._write_user_files()
            restart = self.port != 0
            last_error = ""
            for _attempt in range(_START_ATTEMPTS):
                if not restart:
                    self.port = free_port(self.host)
                log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
                self._spawn()
                try:
                    wait_for_greeting(self.host, self.port, timeout=timeout, alive=self._alive)
                    return self
                except BaseException as exc:
                    self._terminate()
                    if not isinstance(exc, ServerStartError | TimeoutError):
                        raise
                    tail = log_tail(self.log_file, start=log_offset)
                    last_error = f"{exc}\n--- {self.log_file} ---\n{tail}"
                    if "address already in use" not in tail.lower():
                        break
                    if restart:
                        time.sleep(0.5)
            raise ServerStartError(f"pymap failed to start: {last_error}")

    def _spawn(self) -> None:
        self._close_log_handle()
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        # pymap writes metadata through temporary files that it renames into
        # the mail store: keep them on the same file system.
        env["TMPDIR"] = str(self.root / "tmp")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONWARNINGS", None)
        args = [
            *die_with_parent_prefix(), sys.executable, "-c", _RUN_PYMAP,
            "--no-service", "admin", "--no-service", "managesieve", "--no-service", "swim",
            "--host", self.host, "--port", str(self.port),
            "--cert", str(self.ca.cert_file), "--key", str(self.ca.key_file),
            "maildir", str(self.root),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
            start_new_session=True,
        )

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._process = None
        self._close_log_handle()

    def _close_log_handle(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self) -> None:
        """Stop pymap and wait until its port is closed. Idempotent.

        Users and mail stay; :meth:`start` brings the server back.
        """
        with self._lock:
            if self._process is None:
                return
            self._terminate()
            deadline = time.monotonic() + 5
            while port_is_open(self.host, self.port, timeout=0.2):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pymap port {self.port} still open after stop")
                time.sleep(0.02)

    def __enter__(self) -> PymapServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ file access

    @contextmanager
    def _file_lock(self, lock_path: Path) -> Iterator[None]:
        """pymap's lock protocol: the lock file exists while a writer holds it."""
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {lock_path} held for {_LOCK_TIMEOUT} s") from None
                time.sleep(0.01)
                continue
            os.close(fd)
            break
        try:
            yield
        finally:
            with suppress(FileNotFoundError):
                os.unlink(lock_path)

    def _replace_file(self, path: Path, text: str, mode: int = 0o600) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)

    def _write_user_files(self) -> None:
        from pysasl.hashing import BuiltinHash

        hasher = BuiltinHash(rounds=_HASH_ROUNDS)
        passwd = "".join(f"{email}:x::::users/{email}:\r\n" for email in sorted(self._users))
        shadow = "".join(
            f"{email}:{hasher.hash(password)}:::::::\r\n"
            for email, password in sorted(self._users.items())
        )
        with self._file_lock(self.root / "pymap-etc-passwd.lock"):
            self._replace_file(self.root / "pymap-etc-shadow", shadow)
            self._replace_file(self.root / "pymap-etc-passwd", passwd, 0o644)

    def _make_folder(self, path: Path, *, subfolder: bool) -> None:
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        if subfolder:
            (path / "maildirfolder").touch()
        keywords = path / "dovecot-keywords"
        if not keywords.exists():
            self._replace_file(keywords, "".join(f"{i} {kw}\n" for i, kw in enumerate(KEYWORDS)))

    def has_user(self, email: str) -> bool:
        return email.lower() in self._users

    def add_user(self, email: str, password: str) -> None:
        """Create (or update the password of) a user with INBOX and Sent."""
        _check_email(email)
        if "\n" in password or "\r" in password:
            raise ValueError("passwords must not contain line breaks")
        email = email.lower()
        with self._lock:
            self._users[email] = password
            self._write_user_files()
            maildir = self.maildir(email)
            self._make_folder(maildir, subfolder=False)
            self._make_folder(maildir_folder_path(maildir, "Sent", utf7=False), subfolder=True)
            subscriptions = maildir / "subscriptions"
            with self._file_lock(maildir / "subscriptions.lock"):
                existing = subscriptions.read_text().split() if subscriptions.exists() else []
                if "Sent" not in existing:
                    self._replace_file(
                        subscriptions, "".join(f"{s}\r\n" for s in [*existing, "Sent"])
                    )

    def _folder_dir(self, email: str, folder: str, *, create: bool = False) -> Path:
        email = email.lower()
        if email not in self._users:
            raise KeyError(f"no such test user: {email}")
        path = maildir_folder_path(self.maildir(email), folder, utf7=False)
        if create and not (path / "cur").is_dir():
            self._make_folder(path, subfolder=folder.upper() != "INBOX")
        return path

    def deliver(self, email: str, raw: bytes, folder: str = "INBOX") -> None:
        """Write *raw* into the folder's ``new/`` and assign it the next UID."""
        from pymap.backend.maildir.uidlist import Record, UidList
        from pymap.parsing.specials import ObjectId

        folder_dir = self._folder_dir(email, folder, create=True)
        with self._lock:
            self._counter += 1
            now = time.time()
            host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
            key = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{self._counter}.{host}"
        tmp_path = folder_dir / "tmp" / key
        with open(tmp_path, "wb") as handle:
            handle.write(raw)
        with self._file_lock(folder_dir / UidList.LOCK_FILE):
            uidlist = UidList.file_read(str(folder_dir))
            os.rename(tmp_path, folder_dir / "new" / key)
            fields = {"E": str(ObjectId.random_email_id()), "T": str(ObjectId.random_thread_id())}
            uidlist.set(Record(uidlist.next_uid, fields, key))
            uidlist.next_uid += 1
            self._write_uidlist(folder_dir, uidlist)

    def _write_uidlist(self, folder_dir: Path, uidlist: object) -> None:
        import io

        buffer = io.StringIO()
        uidlist.write(buffer)  # type: ignore[attr-defined]
        self._replace_file(folder_dir / "dovecot-uidlist", buffer.getvalue())

    def uidvalidity(self, email: str, folder: str = "INBOX") -> int:
        """The folder's current UIDVALIDITY."""
        from pymap.backend.maildir.uidlist import UidList

        folder_dir = self._folder_dir(email, folder)
        value: int = UidList.file_read(str(folder_dir)).uid_validity
        return value

    def reset_uidvalidity(self, email: str, folder: str = "INBOX") -> None:
        """Give the folder a new UIDVALIDITY; messages, UIDs and flags stay."""
        from pymap.backend.maildir.uidlist import UidList

        folder_dir = self._folder_dir(email, folder, create=True)
        with self._file_lock(folder_dir / UidList.LOCK_FILE):
            uidlist = UidList.file_read(str(folder_dir))
            current = uidlist.uid_validity
            uidlist.uid_validity = current + 1 if current < 0xFFFFFFFF else 1
            self._write_uidlist(folder_dir, uidlist)

    def messages(self, email: str, folder: str = "INBOX") -> list[bytes]:
        return read_maildir_messages(self._folder_dir(email, folder))

    def flags(self, email: str, folder: str = "INBOX") -> list[set[str]]:
        return read_maildir_flags(self._folder_dir(email, folder))

    def __repr__(self) -> str:
        return f"<PymapServer {self.host}:{self.port} root={self.root}>"
