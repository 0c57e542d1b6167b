"""Email in and out: building what the CRM sends, parsing what arrives.

One import point for the rest of threadsync; the work is done in
:mod:`threadsync.core.mime.build` (outgoing messages and header checks) and
:mod:`.parse` (robust parsing of received mail), :mod:`.headers`
(header blocks, and the summaries for the membership decision), with
:mod:`threadsync.core.mime.decode` (tolerant decoding of header values and bodies).
"""

from __future__ import annotations

from threadsync.core.mime.build import (
    AttachmentIn,
    addr_spec,
    build_message,
    check_address,
    check_header_value,
    check_recipient,
)
from threadsync.core.mime.decode import parse_msgid_list
from threadsync.core.mime.headers import summarize_headers
from threadsync.core.mime.parse import ParsedAttachment, ParsedMessage, parse_message

__all__ = [
    "AttachmentIn",
    "ParsedAttachment",
    "ParsedMessage",
    "addr_spec",
    "build_message",
    "check_address",
    "check_header_value",
    "check_recipient",
    "parse_message",
    "parse_msgid_list",
    "summarize_headers",
]
