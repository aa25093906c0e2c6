"""Process logging: diagnostics to stderr, the access log to stdout, and no traceback for
a client's malformed request."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import HttpProcessingError


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every request it cannot parse (CL+TE, bad chunk sizes, overlong
    lines...) at ERROR with a traceback: anyone on the internet could flood the log.
    Such a request is the client's fault and already answered 400: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: rejected malformed request: {exc.message}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(level: str, process: str = "") -> None:
    """``process``: a tag for every diagnostic line (``worker-1`` under ``--workers``)."""
    tag = f"[{process}] " if process else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
    access = logging.getLogger("geoproxy.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
