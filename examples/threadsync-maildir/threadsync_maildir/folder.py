"""One Maildir folder with stable numbers for its messages.

A Maildir has no UIDs: messages are files whose names change when flags
change. Like Dovecot's ``dovecot-uidlist``, this keeps a small JSON file in the
folder (``threadsync-uidlist.json``) that gives every message a number the
first time a scan sees it, in arrival order, and never reuses a number. A
message that lands late always gets a higher number than everything seen
before, so a cursor "next number to read" never misses mail. ``uidvalidity``
changes only if the file is lost, which tells the reader to start over.

Everything here is blocking file work: the provider runs it in a thread.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UIDLIST = "threadsync-uidlist.json"
_ARRIVAL = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)")
_DELIVERIES = itertools.count(1)


@dataclass(frozen=True)
class Listing:
    """The folder's numbering after a scan."""

    uidvalidity: int
    next_uid: int
    files: dict[int, Path]


def _key(name: str) -> str:
    """The unique part of a Maildir file name (without ``:2,FLAGS``)."""
    return name.split(":", 1)[0]


def _arrival(path: Path) -> tuple[int, int, int, int, str]:
    """Sort key for files a scan sees for the first time: modification time, then
    the delivery time and counter that common delivery agents put in the name."""
    match = _ARRIVAL.match(path.name)
    sec, usec, count = (int(g) for g in match.groups()) if match else (0, 0, 0)
    return (path.stat().st_mtime_ns, sec, usec, count, path.name)


class MaildirFolder:
    """A Maildir (``cur``, ``new``, ``tmp``) at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return all((self.path / sub).is_dir() for sub in ("cur", "new", "tmp"))

    def message_files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                if entry.is_file() and not entry.name.startswith("."):
                    files[_key(entry.name)] = Path(entry.path)
        return files

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / (UIDLIST + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def scan(self) -> Listing:
        """Number every message not numbered yet; forget vanished ones."""
        with self._locked():
            state = self._read()
            known: dict[str, int] = state["uids"]
            files = self.message_files()
            fresh = sorted((p for k, p in files.items() if k not in known), key=_arrival)
            for path in fresh:
                known[_key(path.name)] = state["next_uid"]
                state["next_uid"] += 1
            gone = [k for k in known if k not in files]
            for key in gone:
                del known[key]
            if fresh or gone:
                self._write(state)
        return Listing(
            uidvalidity=state["uidvalidity"],
            next_uid=state["next_uid"],
            files={uid: files[key] for key, uid in known.items()},
        )

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path / UIDLIST, encoding="utf-8") as handle:
                data: dict[str, Any] = json.load(handle)
            return data
        except FileNotFoundError:
            return {"uidvalidity": int(time.time()), "next_uid": 1, "uids": {}}

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.path / f".{UIDLIST}.{secrets.token_hex(4)}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        os.replace(tmp, self.path / UIDLIST)

    def add(self, raw: bytes, *, seen: bool = False) -> Path:
        """Deliver ``raw`` the Maildir way: write in ``tmp``, then rename."""
        name = unique_name()
        tmp = self.path / "tmp" / name
        tmp.write_bytes(raw)
        final = self.path / "cur" / f"{name}:2,S" if seen else self.path / "new" / name
        os.rename(tmp, final)
        return final


def unique_name() -> str:
    """A Maildir file name: delivery time, process, a counter (``sec.MusecPpidQn``)."""
    now = time.time()
    usec = int(now * 1_000_000) % 1_000_000
    return f"{int(now)}.M{usec:06d}P{os.getpid()}Q{next(_DELIVERIES)}.threadsync"


def read_headers(path: Path) -> bytes:
    """The header block of a message file (up to the first empty line)."""
    lines = []
    with open(path, "rb") as handle:
        for line in handle:
            if line in (b"\n", b"\r\n"):
                break
            lines.append(line)
    return b"".join(lines)
