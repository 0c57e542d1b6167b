"""A private Dovecot 2.3 instance for tests.

:class:`DovecotServer` writes a self-contained configuration into a directory
and runs ``dovecot -F -c CONF`` as a child process (in its own process group):

* IMAP on two free loopback ports: plaintext with STARTTLS (``port``) and
  implicit TLS (``tls_port``), both presenting the test CA's server
  certificate;
* users in a ``passwd-file`` (``{PLAIN.b64}`` passwords, so any password
  works), mail in ``Maildir`` under ``<root>/mail/<user>/Maildir``;
* a special-use ``\\Sent`` folder named ``Sent`` (``auto = subscribe``),
  CONDSTORE/QRESYNC and IDLE (Dovecot 2.3 defaults), plaintext LOGIN allowed;
* ``base_dir``/``state_dir``/log inside the directory, so nothing collides
  with a system instance;
* no auth penalty: the auth process cannot reach anvil's penalty socket
  (``mode = 0``). Otherwise each failed login adds a per-IP delay of 2 s to
  15 s to every later login from 127.0.0.1, successful ones included. A
  failed login still takes 0.5 s: with ``auth_failure_delay = 0``, Dovecot
  2.3 still answers failures from a 500 ms timer.

Running as root, Dovecot refuses to access mail as uid 0, so mail belongs to
``nobody``; every directory on the path to the configuration, the users file
and the mail store must then be traversable by that user and by Dovecot's
internal users. When the given working directory is not (pytest's per-user
base temporary directory is mode 0700), the instance lives in a fresh
world-traversable temporary directory instead (named in
``dovecot-root.txt`` in the working directory, its log copied there as
``dovecot.log`` on each stop), removed when the server object is collected or
the interpreter exits. As non-root, everything runs as the calling user.

:meth:`DovecotServer.stop` keeps users and mail, and :meth:`~DovecotServer.start`
after it brings the instance back on the same ports (to simulate an outage).

Mail store access without an IMAP session: ``deliver`` uses ``doveadm save``,
``reset_uidvalidity`` ``doveadm mailbox update --uid-validity`` (message UIDs
stay the same; a session that has the folder selected is disconnected with
"IMAP session state is inconsistent"), ``messages``/``flags`` read the Maildir
files in ``dovecot-uidlist`` order. Messages are stored with CRLF line endings
(``mail_save_crlf``), so ``messages`` returns what an IMAP ``BODY[]`` fetch
returns, not necessarily the bytes given to ``deliver``.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
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
    which,
)
from .tlscerts import TestCA

__all__ = ["DovecotBinaries", "DovecotServer", "find_binaries"]

_START_ATTEMPTS = 3
_COMMAND_TIMEOUT = 30.0
_STOP_GRACE = 2.0


@dataclass(frozen=True)
class DovecotBinaries:
    """Paths of the Dovecot programs the fixture uses."""

    dovecot: str
    doveadm: str
    lda: str | None


def find_binaries() -> DovecotBinaries | None:
    """The Dovecot binaries, or None when Dovecot is not installed."""
    dovecot = which("dovecot")
    doveadm = which("doveadm")
    if dovecot is None or doveadm is None:
        return None
    lda = next(
        (
            p
            for p in ("/usr/lib/dovecot/dovecot-lda", "/usr/libexec/dovecot/dovecot-lda")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    return DovecotBinaries(dovecot=dovecot, doveadm=doveadm, lda=lda)


def _traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to *path* has the o+x bit."""
    path = path.resolve()
    for directory in (path, *path.parents):
        try:
            mode = directory.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _check_name(value: str, what: str) -> None:
    if not value or any(c in value for c in ":/\\\r\n\t ") or value.startswith("."):
        raise ValueError(f"unsupported {what} for the test Dovecot: {value!r}")


class DovecotServer:
    """A running (after :meth:`start`) private Dovecot instance."""

    kind = "dovecot"
    supports_condstore = True
    supports_idle = True

    def __init__(self, workdir: Path, ca: TestCA, *, host: str = "127.0.0.1") -> None:
        binaries = find_binaries()
        if binaries is None:
            raise ServerStartError("Dovecot is not installed (dovecot and doveadm not found)")
        self.binaries = binaries
        self.workdir = Path(workdir)
        self.ca = ca
        self.host = host
        self.port = 0
        self.tls_port: int | None = None
        self.root = self.workdir / "dovecot"
        self._root_is_private_tmp = False
        self._prepared = False
        self._users: dict[str, str] = {}
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._running_as_root = os.geteuid() == 0
        if self._running_as_root:
            try:
                nobody = pwd.getpwnam("nobody")
                self.mail_uid, self.mail_gid = nobody.pw_uid, nobody.pw_gid
            except KeyError:
                self.mail_uid = self.mail_gid = 65534
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()

    # ------------------------------------------------------------------ paths

    @property
    def config_file(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def users_dir(self) -> Path:
        """One passwd-file per user (see :meth:`add_user`)."""
        return self.root / "passwd.d"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "dovecot.log"

    def maildir(self, email: str) -> Path:
        """The root Maildir (INBOX) of a user."""
        return self.root / "mail" / email.lower() / "Maildir"

    # ------------------------------------------------------------- lifecycle

    def _prepare_root(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._running_as_root and not _traversable_by_others(self.workdir):
            candidates = [
                Path(tempfile.gettempdir()),
                Path("/tmp"),
                Path("/var/tmp"),
                Path("/dev/shm"),
            ]
            base = next((c for c in candidates if c.is_dir() and _traversable_by_others(c)), None)
            if base is None:
                raise ServerStartError(
                    f"{self.workdir} is not traversable by the mail user and no world-"
                    "traversable temporary directory exists"
                )
            self.root = Path(tempfile.mkdtemp(prefix="threadsync-dovecot-", dir=base))
            self._root_is_private_tmp = True
            (self.workdir / "dovecot-root.txt").write_text(f"{self.root}\n")
            # Kept across stop()/start(); removed when this object is
            # collected or the interpreter exits.
            weakref.finalize(self, shutil.rmtree, self.root, True)
        else:
            self.root = self.workdir / "dovecot"
            self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("run", "state", "log"):
            (self.root / sub).mkdir(exist_ok=True)
            (self.root / sub).chmod(0o755)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        mail.chmod(0o700)
        if self._running_as_root:
            os.chown(mail, self.mail_uid, self.mail_gid)
        self.users_dir.mkdir(exist_ok=True)
        self.users_dir.chmod(0o755)

    def _config_text(self) -> str:
        root = self.root
        # Only root may chroot(); as non-root the chrooting services run unjailed.
        no_chroot = [] if self._running_as_root else ["  chroot ="]
        lines = [
            "# Private test instance; generated, do not edit.",
            "protocols = imap",
            f"listen = {self.host}",
            f"base_dir = {root / 'run'}",
            f"state_dir = {root / 'state'}",
            f"instance_name = threadsync-test-{os.getpid()}-{self.port}",
            f"log_path = {self.log_file}",
            f"info_log_path = {self.log_file}",
            f"debug_log_path = {self.log_file}",
            'log_timestamp = "%Y-%m-%d %H:%M:%S "',
            f"first_valid_uid = {self.mail_uid}",
            "last_valid_uid = 0",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            "auth_username_format = %Lu",
            "auth_failure_delay = 0",
            "mail_max_userip_connections = 1000",
            "ssl = yes",
            f"ssl_cert = <{self.ca.cert_file}",
            f"ssl_key = <{self.ca.key_file}",
            "mail_location = maildir:~/Maildir",
            "mail_save_crlf = yes",
            "mail_fsync = never",
            "passdb {",
            "  driver = passwd-file",
            f"  args = {self.users_dir}/%u",
            "}",
            "userdb {",
            "  driver = static",
            f"  args = uid={self.mail_uid} gid={self.mail_gid} home={root / 'mail'}/%u",
            "}",
            "namespace inbox {",
            "  inbox = yes",
            "  separator = /",
            "  mailbox Sent {",
            "    special_use = \\Sent",
            "    auto = subscribe",
            "  }",
            "}",
            "service imap-login {",
            *no_chroot,
            "  inet_listener imap {",
            f"    address = {self.host}",
            f"    port = {self.port}",
            "  }",
            "  inet_listener imaps {",
            f"    address = {self.host}",
            f"    port = {self.tls_port}",
            "    ssl = yes",
            "  }",
            "}",
            "protocol imap {",
            "  mail_max_userip_connections = 1000",
            "}",
            "# No auth penalty: the auth process cannot reach this socket.",
            "service anvil {",
            *no_chroot,
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            "}",
        ]
        if not self._running_as_root:
            user = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            lines += [
                f"default_internal_user = {user}",
                f"default_internal_group = {group}",
                f"default_login_user = {user}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> DovecotServer:
        """Start Dovecot and wait for its greeting; returns self.

        After :meth:`stop`, ``start`` brings the same instance back on the same
        ports with the same users and mail (an outage in a test).
        """
        with self._lock:
            if self._process is not None:
                return self
            if not self._prepared:
                self._prepare_root()
                self._prepared = True
            restart = self.port != 0
            last_error = ""
            for _attempt in range(_START_ATTEMPTS):
                if not restart:
                    self.port = free_port(self.host)
                    self.tls_port = free_port(self.host)
                    if self.tls_port == self.port:
                        continue
                self.config_file.write_text(self._config_text())
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
                    if "Address already in use" not in tail:
                        break
                    if restart:
                        time.sleep(0.5)
            raise ServerStartError(f"Dovecot failed to start: {last_error}")

    def _spawn(self) -> None:
        self._close_log_handle()
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [*die_with_parent_prefix(), self.binaries.dovecot, "-F", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
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
                # A clean shutdown takes about 1 s; a login process still
                # waiting for the stats process (stop right after start)
                # holds the master for 5 s more, so do not wait for that.
                process.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        # Anything the master left behind in its process group (it was the
        # group leader, so the group id is its pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self._process = None
        self._close_log_handle()

    def _close_log_handle(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self) -> None:
        """Stop Dovecot and wait until its ports are closed. Idempotent.

        Users and mail stay; :meth:`start` brings the instance back.
        """
        with self._lock:
            if self._process is None:
                return
            self._terminate()
            deadline = time.monotonic() + 5
            ports = [p for p in (self.port, self.tls_port) if p]
            while any(port_is_open(self.host, p, timeout=0.2) for p in ports):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Dovecot ports {ports} still open after stop")
                time.sleep(0.02)
            if self._root_is_private_tmp and self.log_file.exists():
                shutil.copyfile(self.log_file, self.workdir / "dovecot.log")

    def __enter__(self) -> DovecotServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ mail store

    def doveadm(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``doveadm -c CONF ARGS`` against this instance."""
        result = subprocess.run(
            [self.binaries.doveadm, "-c", str(self.config_file), *args],
            input=input,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def _write_user(self, email: str, password: str) -> bool:
        """Write the user's passwd-file; True if it replaced a different one."""
        encoded = base64.b64encode(password.encode()).decode("ascii")
        line = f"{email}:{{PLAIN.b64}}{encoded}::::::\n"
        path = self.users_dir / email
        try:
            previous = path.read_text()
            previous_mtime = int(path.stat().st_mtime)
        except FileNotFoundError:
            previous, previous_mtime = None, 0
        if previous == line:
            return False
        tmp = path.with_name(f".{email}.tmp")
        tmp.write_text(line)
        tmp.chmod(0o644)
        # Dovecot notices a change by mtime (whole seconds) or size.
        mtime = max(int(time.time()), previous_mtime + 1)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
        return previous is not None

    def has_user(self, email: str) -> bool:
        return email.lower() in self._users

    def add_user(self, email: str, password: str) -> None:
        """Create (or update the password of) a user with INBOX and Sent."""
        _check_name(email, "e-mail address")
        if "\n" in password or "\r" in password:
            raise ValueError("passwords must not contain line breaks")
        email = email.lower()
        with self._lock:
            changed = self._write_user(email, password)
            self._users[email] = password
        if changed:
            # Dovecot stats a passwd-file at most once per second: make sure
            # the next lookup happens in a later second than the last one.
            time.sleep(1.05 - time.time() % 1)
        # Opening the mailbox list creates the home, INBOX and the
        # auto-created Sent folder.
        self.doveadm("mailbox", "list", "-u", email)
        self.doveadm("mailbox", "status", "-u", email, "messages", "INBOX", "Sent")

    def _require_user(self, email: str) -> str:
        email = email.lower()
        if email not in self._users:
            raise KeyError(f"no such test user: {email}")
        return email

    def deliver(self, email: str, raw: bytes, folder: str = "INBOX") -> None:
        """Store *raw* in the user's *folder* (created if missing) with no flags."""
        email = self._require_user(email)
        result = self.doveadm("save", "-u", email, "-m", folder, input=raw, check=False)
        if result.returncode != 0 and b"doesn't exist" in result.stderr:
            self.doveadm("mailbox", "create", "-u", email, folder)
            result = self.doveadm("save", "-u", email, "-m", folder, input=raw, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"doveadm save failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    def deliver_with_lda(self, email: str, raw: bytes, sender: str = "") -> None:
        """Deliver to INBOX through ``dovecot-lda`` (the way a local MTA would)."""
        email = self._require_user(email)
        if self.binaries.lda is None:
            raise RuntimeError("dovecot-lda is not installed")
        args = [self.binaries.lda, "-c", str(self.config_file), "-d", email]
        if sender:
            args += ["-f", sender]
        result = subprocess.run(
            args, input=raw, capture_output=True, timeout=_COMMAND_TIMEOUT, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"dovecot-lda failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )

    def uidvalidity(self, email: str, folder: str = "INBOX") -> int:
        """The folder's current UIDVALIDITY."""
        email = self._require_user(email)
        out = self.doveadm("mailbox", "status", "-u", email, "uidvalidity", folder).stdout
        match = re.search(rb"uidvalidity=(\d+)", out)
        if match is None:
            raise RuntimeError(f"unexpected doveadm output: {out!r}")
        return int(match.group(1))

    def reset_uidvalidity(self, email: str, folder: str = "INBOX") -> None:
        """Give the folder a new UIDVALIDITY; messages, UIDs and flags stay."""
        email = self._require_user(email)
        current = self.uidvalidity(email, folder)
        new = current + 1 if current < 0xFFFFFFFF else 1
        self.doveadm("mailbox", "update", "-u", email, "--uid-validity", str(new), folder)

    def messages(self, email: str, folder: str = "INBOX") -> list[bytes]:
        email = self._require_user(email)
        return read_maildir_messages(maildir_folder_path(self.maildir(email), folder))

    def flags(self, email: str, folder: str = "INBOX") -> list[set[str]]:
        email = self._require_user(email)
        return read_maildir_flags(maildir_folder_path(self.maildir(email), folder))

    def __repr__(self) -> str:
        return f"<DovecotServer {self.host}:{self.port} tls={self.tls_port} root={self.root}>"
