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
    build_message,
    addr_spec,
    check_address,
    check_recipient,
    check_header_value,
)
from threadsync.core.mime.decode import parse_msgid_list
from threadsync.core.mime.headers import summarize_headers
from threadsync.core.mime.parse import ParsedAttachment, ParsedMessage, parse_message

__all__ = [
    "AttachmentIn",
    "ParsedAttachment",
    "ParsedMessage",
    "build_message",
    "addr_spec",
    "check_address",
    "check_recipient",
    "check_header_value",
    "parse_message",
    "parse_msgid_list",
    "summarize_headers",
]
