"""The global options of threadsync's command line: where they may be written, and
the logging they set up.

``--json``, ``--config PATH``, ``-v`` and ``--log-format`` belong to the
``threadsync`` group, yet people write them after the command name
(``threadsync status acme -v``). :func:`hoist_global_options` moves them to the
front before click parses, walking the command line with click's own
knowledge of every command's options, so the value of an option (``--text
--json``), anything after ``--`` and an option of the same name that a command
defines itself are left where they are. :func:`setup_logging` makes the
handler on stderr: text lines, or one JSON object per line for log shippers,
with the structured ``extra`` fields of each record (connection id, thread id,
direction); the migration tool's loggers stay at WARNING whatever ``-v`` says.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

#: Group options that take a value, and those that do not.
_VALUED = ("--config", "--log-format")
_FLAGS = ("--json", "--verbose")
_SHORT_VERBOSE = re.compile(r"^-v+$")

#: Attributes every ``logging.LogRecord`` has; anything else came through ``extra``.
_RECORD_KEYS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


def _option_table(command: click.Command) -> dict[str, bool]:
    """Every option string of ``command`` -> whether it takes a value."""
    table: dict[str, bool] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            takes_value = not (param.is_flag or param.count)
            for name in (*param.opts, *param.secondary_opts):
                table[name] = takes_value
    return table


def _is_global(token: str, own: dict[str, bool]) -> bool:
    name = token.split("=", 1)[0]
    if name in own:  # the command's own option of that name wins
        return False
    return name in _VALUED or name in _FLAGS or bool(_SHORT_VERBOSE.match(token))


def hoist_global_options(group: click.Group, args: Sequence[str]) -> list[str]:
    """``args`` with the group's options moved before the command name."""
    front: list[str] = []
    rest: list[str] = []
    command: click.Command = group
    own = _option_table(group)
    tokens = list(args)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            rest.extend(tokens[i - 1 :])
            break
        if command is not group and _is_global(token, own):
            front.append(token)
            if token in _VALUED and i < len(tokens):
                front.append(tokens[i])
                i += 1
            continue
        if token.startswith("-") and token != "-":
            rest.append(token)
            name = token.split("=", 1)[0]
            if own.get(name) and "=" not in token and i < len(tokens):
                rest.append(tokens[i])  # the option's value, whatever it looks like
                i += 1
            continue
        rest.append(token)
        if isinstance(command, click.Group) and token in command.commands:
            command = command.commands[token]
            own = _option_table(command)
    return front + rest


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_KEYS and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextLines(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` with the ``extra`` fields at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _RECORD_KEYS and not key.startswith("_")
        ]
        return line + ("  " + " ".join(extra) if extra else "")


def setup_logging(verbose: int, log_format: str) -> None:
    """The root handler on stderr; WARNING, INFO with ``-v``, DEBUG with ``-vv``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else TextLines())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.DEBUG, logging.WARNING - 10 * verbose))
    # Migrations run on every command: their setup lines are not news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
