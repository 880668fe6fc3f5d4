"""Text from users and workers (file names, reasons, errors) made safe to print on a terminal.

A file name is chosen by whoever wrote DATA: an escape sequence in it could retitle the terminal,
hide lines or fake output, a bidirectional override could show a name backwards, and a name
that is not UTF-8 could not be printed at all. :func:`printable` shows each such character as
Python writes it in a string (``\\x1b``, ``\\u202e``, ``\\udcff``); :func:`markup` also escapes
rich's markup, so ``[/b].jpg`` is printed as a name instead of closing a tag.
"""

from __future__ import annotations

import logging
import numbers
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


class PrintableArgs(logging.Filter):
    """A log handler's filter: the arguments of each record (paths, job ids and step names from
    the broker, errors) are spelled out with :func:`printable`, and so is each line of its
    traceback (an exception's message may quote a path); the message's own text stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {k: _arg(v) for k, v in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_arg(a) for a in record.args)
        if record.exc_info and not record.exc_text:  # the formatter then prints this text as it is
            try:
                text = _FORMAT.formatException(record.exc_info)
            except Exception:  # noqa: BLE001 - a traceback object logging cannot walk: the formatter's own way
                return True
            record.exc_text = "\n".join(map(printable, text.splitlines()))
        return True


_FORMAT = logging.Formatter()


def _arg(value: object) -> object:
    return value if value is None or isinstance(value, numbers.Number) else printable(value)
