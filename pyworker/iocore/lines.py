"""Worker-side line splitting of command output (PROTOCOL.md section 4.2).

The master stores what it receives re-split into lines, so the worker only has to send whole
lines, with carriage returns, cursor movements and backspaces turned into newlines exactly
as the reference does. One deliberate difference: a line of ``max_line_length`` (4096)
characters or more is cut into pieces of ``max_line_length - 1`` characters, and no
character is lost (the reference drops some: Buildbot PR #9082).
"""

from __future__ import annotations

import re
from typing import Final

NEWLINE_RE: Final = re.compile(
    r"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)"
)
MAX_LINE_LENGTH: Final = 4096
#: Lines counted for ``max_lines`` (on the decoded text, before splitting).
LINE_COUNT_RE: Final = re.compile(r"\r\n|\r|\n")


def normalize_newlines(text: str) -> str:
    """``NEWLINE_RE.sub('\\n', text)``, without the regex in the common cases.

    Plain text has none of the special characters (found by memchr-speed scans); PTY output
    has only CR LF and lone CRs, which two ``str.replace`` calls turn into newlines exactly as
    the regex does (a CR at the very end waits for the next chunk).
    """
    if "\x1b" in text or "\x08" in text:
        return NEWLINE_RE.sub("\n", text)
    if "\r" not in text:
        return text
    text = text.replace("\r\n", "\n")
    if "\r" not in text:
        return text
    if text.endswith("\r"):
        return text[:-1].replace("\r", "\n") + "\r"
    return text.replace("\r", "\n")


class LineSplitter:
    """Turns a stream of text chunks into whole lines; keeps the unfinished tail."""

    __slots__ = ("_partial", "_piece")

    def __init__(self, max_line_length: int = MAX_LINE_LENGTH) -> None:
        self._partial = ""
        self._piece = max_line_length - 1

    def append(self, text: str) -> str:
        """Add ``text``; return the lines it completes (``''`` if none), each ending in ``\\n``."""
        t = normalize_newlines(self._partial + text if self._partial else text)
        end = t.rfind("\n") + 1
        complete, partial = t[:end], t[end:]
        if len(complete) > self._piece:
            lines = complete.split("\n")
            if max(map(len, lines)) > self._piece:
                complete = self._cut(lines)
        piece = self._piece
        if len(partial) > piece:
            # Whatever follows, these pieces are already 4095-character parts of a long line.
            cut = (len(partial) - 1) // piece * piece
            complete += "".join(partial[i : i + piece] + "\n" for i in range(0, cut, piece))
            partial = partial[cut:]
        self._partial = partial
        return complete

    def flush(self) -> str:
        """At the end of a command: the unfinished tail as a last line (``''`` if none)."""
        if not self._partial:
            return ""
        return self.append("\n")

    def _cut(self, lines: list[str]) -> str:
        """Join ``complete.split('\\n')`` back, long lines cut into 4095-character pieces."""
        piece = self._piece
        out = []
        for line in lines[:-1]:
            if len(line) <= piece:
                out.append(line)
            else:
                out.extend(line[i : i + piece] for i in range(0, len(line), piece))
        out.append("")
        return "\n".join(out)
