"""Real mail servers for the test suite.

Two IMAP servers implement the same :class:`ImapServer` interface:

* ``dovecot`` (:mod:`tests.servers.dovecot`): the primary server. A private
  Dovecot instance (``dovecot -F``) on loopback ports, with STARTTLS,
  implicit TLS, CONDSTORE/QRESYNC, IDLE and a special-use ``\\Sent`` folder.
* ``pymap`` (:mod:`tests.servers.pymap_server`): a pure-Python fallback with
  fewer features (no CONDSTORE/QRESYNC, no SPECIAL-USE, STARTTLS only); see
  that module for its limits.

:func:`start_imap_server` starts one of them; the kind defaults to the
``THREADSYNC_TEST_IMAP`` environment variable (``dovecot`` or ``pymap``), else
Dovecot when installed, else pymap. :mod:`tests.servers.smtp` is an SMTP
submission server that can act as the local MTA for an IMAP server, and
:mod:`tests.servers.tlscerts` makes the throwaway CA both trust.

Both IMAP servers keep mail in Maildir++ folders with Dovecot's
``dovecot-uidlist``/``dovecot-keywords`` metadata files, so the helpers at the
bottom of this module read messages and flags for either of them straight from
disk, without an IMAP session that could alter state (``\\Recent``, ``\\Seen``).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from .tlscerts import TestCA, make_test_ca

__all__ = [
    "IMAP_KINDS",
    "IMAP_KIND_ENV",
    "ImapServer",
    "ServerStartError",
    "TestCA",
    "available_imap_kinds",
    "default_imap_kind",
    "dovecot_installed",
    "free_port",
    "imap_utf7_encode",
    "make_test_ca",
    "port_is_open",
    "pymap_installed",
    "start_imap_server",
]

_T = TypeVar("_T")

IMAP_KIND_ENV = "THREADSYNC_TEST_IMAP"
IMAP_KINDS = ("dovecot", "pymap")


class ServerStartError(RuntimeError):
    """A test server failed to start; the message includes its log tail."""


@runtime_checkable
class ImapServer(Protocol):
    """The common interface of the test IMAP servers.

    * ``add_user`` is idempotent (a new password replaces the old one) and
      creates INBOX plus a subscribed ``Sent`` folder (special-use ``\\Sent``
      where the server supports SPECIAL-USE). E-mail addresses are
      case-insensitive; they must not contain ``/``, ``:`` or whitespace.
    * ``has_user`` tells whether ``add_user`` was called for an address.
    * ``deliver``, ``messages``, ``flags`` and ``reset_uidvalidity`` work on
      the mail store directly, without an IMAP session. ``deliver`` creates a
      missing folder and stores the message without flags.
    * ``messages`` returns the stored bytes in UID order. Dovecot stores CRLF
      line endings whatever it was given; pymap stores ``deliver``'d bytes as
      given but APPENDed messages with bare LF. Compare with line endings
      normalised when a test runs on both.
    * ``flags`` are IMAP flag names (``\\Seen``, ``$Forwarded``); the session
      flag ``\\Recent`` is never reported.
    * ``reset_uidvalidity`` gives the folder a new, larger UIDVALIDITY and keeps
      its messages, their UIDs and flags.
    * ``stop`` is idempotent and returns once the ports are closed.
    """

    kind: str
    host: str
    port: int
    tls_port: int | None
    ca: TestCA
    supports_condstore: bool
    supports_idle: bool

    def add_user(self, email: str, password: str) -> None: ...

    def has_user(self, email: str) -> bool: ...

    def deliver(self, email: str, raw: bytes, folder: str = "INBOX") -> None: ...

    def messages(self, email: str, folder: str = "INBOX") -> list[bytes]: ...

    def reset_uidvalidity(self, email: str, folder: str = "INBOX") -> None: ...

    def flags(self, email: str, folder: str = "INBOX") -> list[set[str]]: ...

    def stop(self) -> None: ...


def dovecot_installed() -> bool:
    """True if the Dovecot binaries needed by the Dovecot fixture exist."""
    from .dovecot import find_binaries

    return find_binaries() is not None


def pymap_installed() -> bool:
    """True if the ``pymap`` package can be imported."""
    try:
        import pymap  # noqa: F401
    except ImportError:
        return False
    return True


def available_imap_kinds() -> list[str]:
    """The IMAP server kinds that can run here, primary first."""
    kinds = []
    if dovecot_installed():
        kinds.append("dovecot")
    if pymap_installed():
        kinds.append("pymap")
    return kinds


def default_imap_kind() -> str:
    """``$THREADSYNC_TEST_IMAP`` if set, else Dovecot when installed, else pymap."""
    wanted = os.environ.get(IMAP_KIND_ENV, "").strip().lower()
    if wanted:
        if wanted not in IMAP_KINDS:
            raise ValueError(f"{IMAP_KIND_ENV}={wanted!r}: expected one of {IMAP_KINDS}")
        return wanted
    return "dovecot" if dovecot_installed() else "pymap"


def start_imap_server(
    workdir: Path, kind: str | None = None, *, ca: TestCA | None = None
) -> ImapServer:
    """Start an IMAP server keeping its files under *workdir*.

    *kind* is ``"dovecot"`` or ``"pymap"`` (default: :func:`default_imap_kind`).
    *ca* is the CA whose server certificate the server presents; a new one is
    made in ``workdir / "tls"`` when omitted.
    """
    kind = kind or default_imap_kind()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca = make_test_ca(workdir / "tls")
    if kind == "dovecot":
        from .dovecot import DovecotServer

        return DovecotServer(workdir, ca).start()
    if kind == "pymap":
        from .pymap_server import PymapServer

        return PymapServer(workdir, ca).start()
    raise ValueError(f"unknown IMAP server kind {kind!r}: expected one of {IMAP_KINDS}")


# --------------------------------------------------------------------------
# Network helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_greeting(host: str, port: int, timeout: float = 1.0) -> bytes | None:
    """Connect and return the first line the server sends, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data or None
    except OSError:
        return None


def wait_for_greeting(
    host: str, port: int, *, timeout: float, alive: Callable[[], bool] | None = None
) -> bytes:
    """Poll until an IMAP ``* OK`` greeting arrives; raise TimeoutError otherwise.

    *alive* is called between attempts; when it returns False the wait stops
    early with :class:`ServerStartError` (the process died).
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        greeting = read_greeting(host, port)
        if greeting is not None and greeting.startswith(b"* OK"):
            return greeting
        if alive is not None and not alive():
            raise ServerStartError("server process exited during start-up")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no IMAP greeting on {host}:{port} within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def die_with_parent_prefix() -> list[str]:
    """Command prefix making a server die when this process dies.

    ``setpriv --pdeathsig TERM`` (util-linux) exec()s the server with a parent
    death signal, so a test run that is killed outright (no fixture
    teardown) does not leave a server running. The signal fires when the
    *thread* that started the child exits, so it is only used from the main
    thread.
    """
    setpriv = which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


def log_tail(path: Path, lines: int = 40, *, start: int = 0) -> str:
    """The last *lines* of a log file from byte offset *start*, or a note."""
    try:
        data = path.read_bytes()[start:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------
# Maildir++ helpers shared by both IMAP servers


_SYSTEM_FLAG_LETTERS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}


def imap_utf7_encode(name: str) -> str:
    """Encode a mailbox name in IMAP modified UTF-7 (RFC 3501 section 5.1.3)."""
    import base64

    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append(
                "&" + base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") + "-"
            )
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def maildir_folder_path(maildir: Path, folder: str, *, utf7: bool = True) -> Path:
    """The directory of *folder* in a Maildir++ store rooted at *maildir*.

    ``INBOX`` is the root; ``A/B`` is ``.A.B``. With *utf7*, non-ASCII names are
    stored in modified UTF-7 (Dovecot); pymap stores them as given.
    """
    if folder.upper() == "INBOX":
        return maildir
    name = imap_utf7_encode(folder) if utf7 else folder
    return maildir / ("." + name.replace("/", "."))


def _uidlist_entries(folder_dir: Path) -> list[tuple[int, str]]:
    """(uid, maildir key) pairs from ``dovecot-uidlist``, in UID order."""
    try:
        lines = (folder_dir / "dovecot-uidlist").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    entries: list[tuple[int, str]] = []
    for line in lines[1:]:  # the first line is the header (version, V, N, G)
        if ":" not in line:
            continue
        before, filename = line.split(":", 1)
        fields = before.split()
        if not fields or not fields[0].isdigit():
            continue
        entries.append((int(fields[0]), filename.strip().split(":", 1)[0]))
    entries.sort()
    return entries


def _maildir_files(folder_dir: Path) -> dict[str, Path]:
    """Maildir key (file name before the ``:`` info part) -> file path."""
    files: dict[str, Path] = {}
    for sub in ("new", "cur"):
        try:
            names = os.listdir(folder_dir / sub)
        except FileNotFoundError:
            continue
        for name in names:
            files[name.split(":", 1)[0]] = folder_dir / sub / name
    return files


def _ordered_files(folder_dir: Path) -> list[Path]:
    """The message files of a folder in UID order (unknown files last)."""
    files = _maildir_files(folder_dir)
    ordered: list[Path] = []
    for _uid, key in _uidlist_entries(folder_dir):
        path = files.pop(key, None)
        if path is not None:
            ordered.append(path)
    # Files no IMAP session has seen yet get UIDs later, in arrival order.
    ordered.extend(sorted(files.values(), key=lambda p: (p.stat().st_mtime, p.name)))
    return ordered


def _retrying(read: Callable[[], _T], folder_dir: Path) -> _T:
    """Run *read*, retrying when a file vanishes under it: the server renames
    message files on flag changes and on the new/ -> cur/ move."""
    for _attempt in range(10):
        try:
            return read()
        except FileNotFoundError:
            time.sleep(0.01)
    raise OSError(errno.EAGAIN, f"maildir kept changing while being read: {folder_dir}")


def read_maildir_messages(folder_dir: Path) -> list[bytes]:
    """Raw bytes of every message in a Maildir folder, in UID order."""
    return _retrying(lambda: [p.read_bytes() for p in _ordered_files(folder_dir)], folder_dir)


def _read_keywords(folder_dir: Path) -> dict[str, str]:
    """Maildir keyword letter -> IMAP keyword, from ``dovecot-keywords``."""
    keywords: dict[str, str] = {}
    try:
        text = (folder_dir / "dovecot-keywords").read_text(errors="replace")
    except FileNotFoundError:
        return keywords
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < 26:
            keywords[chr(ord("a") + int(parts[0]))] = parts[1]
    return keywords


def _file_flags(path: Path, keywords: dict[str, str]) -> set[str]:
    flags: set[str] = set()
    if ":2," in path.name:
        for letter in path.name.rsplit(":2,", 1)[1]:
            if letter in _SYSTEM_FLAG_LETTERS:
                flags.add(_SYSTEM_FLAG_LETTERS[letter])
            elif letter in keywords:
                flags.add(keywords[letter])
    return flags


def read_maildir_flags(folder_dir: Path) -> list[set[str]]:
    """IMAP flags of every message in a Maildir folder, in UID order."""

    def read() -> list[set[str]]:
        keywords = _read_keywords(folder_dir)
        return [_file_flags(path, keywords) for path in _ordered_files(folder_dir)]

    return _retrying(read, folder_dir)


def which(
    name: str, extra_dirs: Iterable[str] = ("/usr/sbin", "/usr/local/sbin", "/sbin")
) -> str | None:
    """Like :func:`shutil.which`, also looking in the sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None
