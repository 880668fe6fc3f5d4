"""Text from users and workers (file names, reasons, errors) made safe to print on a terminal.

A file name is chosen by whoever wrote DATA: an escape sequence in it could retitle the terminal,
hide lines or fake output, a bidirectional override could show a name backwards, and a name
that is not UTF-8 could not be printed at all. :func:`printable` shows each such character as
Python writes it in a string (``\\x1b``, ``\\u202e``, ``\\udcff``); :func:`markup` also escapes
rich's markup, so ``[/b].jpg`` is printed as a name instead of closing a tag.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL, line and paragraph separators, bidirectional controls, and the lone
# surrogates Python decodes undecodable bytes of a file name into.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object) -> str:
    """``text`` with every control, bidirectional or undecodable character spelled out."""
    return _UNSAFE.sub(lambda m: ascii(m.group())[1:-1], str(text))


def markup(text: object) -> str:
    """:func:`printable`, escaped for rich markup (a table cell, a ``console.print``)."""
    from rich.markup import escape

    return escape(printable(text))
