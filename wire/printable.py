"""Text a client sent, as an operator's log or terminal shows it: escaped where not printable.

What a client writes to the log, and the paths and values the trace prints,
must not forge a line or drive the terminal that shows them: every
character that is not printable (`str.isprintable`: newline, ESC, CR, BEL,
backspace, DEL, C1 controls, bidi overrides and other format characters) is
shown as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`, a byte that is not UTF-8 as
`\\xNN`, and a backslash as `\\\\`, so that no escape can be typed as text.
The log scheme (schemes/log.py) and the trace (redoxcap/trace.py) both show
client text through here.
"""

from __future__ import annotations


def escape(raw: bytes) -> str:
    """Bytes as they are shown: printable text as is, anything else escaped.

    Args:
        raw: what the client sent (a log line without its newline, say).

    Returns:
        The text, with non-printable characters and bytes that are not UTF-8
        as backslash escapes and each backslash doubled.
    """
    return escape_text(raw.decode("utf-8", "surrogateescape"))


def escape_text(text: str) -> str:
    """text with non-printable characters as backslash escapes and each backslash doubled."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case: no per-character work
    return "".join(map(_escape_char, text))


def _escape_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for a byte that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
