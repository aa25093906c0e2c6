"""Walking a chunked request body as it arrives, before aiohttp's parser reads it.

aiohttp's request parser (llhttp, strict) refuses a chunk extension with whitespace
around its ``;`` or ``=`` (``3; a=1``), which RFC 9112 7.1.1 allows (``BWS``): a client
that sends one got a 400 through geoproxy and a 200 straight from the geode. ``ChunkedBody``
takes that whitespace out of each chunk-size line and passes everything else (chunk data,
the trailer section, what follows the body) as it came. The body goes on to the geode
chunked again, without extensions, so nothing the client meant is lost.
"""

from __future__ import annotations

import re

#: A chunk-size line longer than this is left to the parser (which refuses it).
MAX_LINE = 4096
_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}").fullmatch
_BWS = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t]+')


def _tidy(line: bytes) -> bytes:
    """A chunk-size line without the whitespace outside quoted strings."""
    if b" " not in line and b"\t" not in line:
        return line
    return _BWS.sub(lambda m: m.group(0) if m.group(0)[:1] == b'"' else b"", line)


class ChunkedBody:
    """One chunked body, fed as it arrives: ``feed`` returns the bytes to parse, and
    ``done`` turns True once the body's last line went through (what follows it in the
    same feed is returned untouched)."""

    __slots__ = ("done", "left", "line", "trailers")

    def __init__(self) -> None:
        self.line = b""  # a chunk-size or trailer line not yet ended
        self.left = 0  # chunk data (and its CRLF) still to pass
        self.trailers = False  # past the last chunk: in the trailer section
        self.done = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        at, end = 0, len(data)
        while at < end and not self.done:
            if self.left:
                take = min(self.left, end - at)
                out.append(data[at : at + take])
                at += take
                self.left -= take
                continue
            nl = data.find(b"\n", at)
            if nl < 0:
                self.line += data[at:]
                at = end
                if len(self.line) > MAX_LINE:  # not a chunk-size line: the parser judges
                    out.append(self.line)
                    self.line, self.done = b"", True
                break
            line, self.line = self.line + data[at : nl + 1], b""
            at = nl + 1
            if self.trailers:
                out.append(line)
                self.done = line in (b"\r\n", b"\n")
                continue
            line = _tidy(line)
            out.append(line)
            size = line.split(b";", 1)[0].rstrip(b"\r\n")
            if not _SIZE(size):
                self.done = True  # malformed: the parser answers it with a 400
            elif int(size, 16) == 0:
                self.trailers = True
            else:
                self.left = int(size, 16) + 2  # the data and its CRLF
        if at < end:
            out.append(data[at:])
        return b"".join(out)
