"""Email in and out: building what the CRM sends, parsing what arrives.

One import point for the rest of threadsync; the work is done in
:mod:`core.mime_build` (outgoing messages and header checks) and
:mod:`core.mime_parse` (robust parsing of received mail), :mod:`core.mime_headers`
(header blocks, and the summaries for the membership decision), with
:mod:`core.mime_decode` (tolerant decoding of header values and bodies).
"""

from __future__ import annotations

from core.mime_build import AttachmentIn, build_message, check_address, check_header_value
from core.mime_decode import parse_msgid_list
from core.mime_headers import summarize_headers
from core.mime_parse import ParsedAttachment, ParsedMessage, parse_message

__all__ = [
    "AttachmentIn",
    "ParsedAttachment",
    "ParsedMessage",
    "build_message",
    "check_address",
    "check_header_value",
    "parse_message",
    "parse_msgid_list",
    "summarize_headers",
]
