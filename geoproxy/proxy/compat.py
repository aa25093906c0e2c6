"""aiohttp's private names geoproxy leans on, and what runs when they are not there.

The fast lane (``fastlane.py``), the lean upstream client (``upstream.py``,
``connection.py``), the response writers (``responses.py``) and the batched accepts
(``process/acceptor.py``) use private aiohttp API
for speed and to pass bytes as they came. They are tested against the aiohttp releases
in ``TESTED`` (the window ``pyproject.toml`` pins). ``probe()`` checks, once per
process, that the aiohttp installed is in that window and has every private name with
the shape used; when it is not, geoproxy runs in **public** mode: aiohttp's own server
protocol, its ``ClientSession`` for every request, plain ``web.Response`` objects.
Slower, and without the byte-for-byte guarantees the lean mode adds (README, "aiohttp
versions"), but serving; ``warn_if_public()`` says why, once logging is set up.
``GEOPROXY_AIOHTTP=public`` picks public mode on purpose (a way out should a release
inside the window misbehave); ``geoproxy_build_info{mode}`` says which mode runs.

tests/test_compat.py fingerprints every aiohttp function geoproxy copies or overrides, so
a new aiohttp release cannot widen the window without a review of each.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from collections.abc import Iterable

import aiohttp

log = logging.getLogger("geoproxy")

#: The aiohttp releases the lean mode is tested with: from the first, up to (not
#: including) the second. Keep in step with the pin in pyproject.toml.
TESTED = ((3, 14, 5), (3, 15, 0))
LEAN, PUBLIC = "lean", "public"
ENV = "GEOPROXY_AIOHTTP"

# Class attributes (methods, slots) of each class, by module and class name.
_CLASS_NAMES: dict[tuple[str, str], str] = {
    ("aiohttp.web_protocol", "RequestHandler"): (
        "_waiter _messages _parser _payload_parser _upgraded _close _force_close "
        "_request_count _max_msg_queue_size _buffer_paused _pause_reading_for_buffer "
        "_resume_reading_for_buffer _message_tail _keepalive_handle "
        "_next_keepalive_close_time _process_keepalive _request_in_progress "
        "_handler_waiter _request_factory _handle_request _current_request _read_bufsize "
        "_keepalive_timeout _manager _loop max_line_size max_field_size max_headers "
        "data_received handle_error force_close log_exception"
    ),
    ("aiohttp.client_proto", "ResponseHandler"): (
        "_reschedule_timeout _drop_timeout _on_read_timeout _reading_paused _buffer_paused "
        "set_response_params force_close start_timeout read data_received resume_reading "
        "should_close closed"
    ),
    ("aiohttp.streams", "StreamReader"): "_buffer",
    ("aiohttp.web_response", "StreamResponse"): (
        "_payload_writer _prepare_headers _write_headers _must_be_empty_body _keep_alive "
        "_req _eof_sent _body_length _start"
    ),
    ("aiohttp.http_writer", "StreamWriter"): "enable_chunking write write_eof drain length",
    ("aiohttp.web_runner", "BaseSite"): "_server _runner _ssl_context",
}
# Instance attributes (checked in the source of the class and its aiohttp bases:
# ``self.<name> =``).
_INIT_NAMES: dict[tuple[str, str], str] = {
    ("aiohttp.client_proto", "ResponseHandler"): (
        "_exception _skip_payload _read_timeout _should_close _payload _tail _parser"
    ),
    ("aiohttp.web_response", "StreamResponse"): "_headers _status _reason",
    ("aiohttp.web_request", "BaseRequest"): "_payload_writer _task",
    ("aiohttp.streams", "DataQueue"): "_buffer",
}
# Module-level names.
_MODULE_NAMES: dict[str, str] = {
    "aiohttp.web_protocol": "_ErrInfo RequestPayloadError",
    "aiohttp.http_writer": "_serialize_headers",
    "aiohttp.http": "HttpRequestParser",
}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _missing(
    module_name: str,
    owner: object,
    names: Iterable[str],
    init_source: str | None,
) -> list[str]:
    where = f"{module_name}.{getattr(owner, '__name__', owner)}"
    if init_source is None:
        return [f"{where}.{n}" for n in names if not hasattr(owner, n)]
    return [
        f"{where}.{n}"
        for n in names
        if f"self.{n} =" not in init_source and f"self.{n}: " not in init_source
    ]


def probe(version: str | None = None) -> str | None:
    """Why the lean mode cannot run with the aiohttp installed, or None when it can."""
    import importlib

    version = version or aiohttp.__version__
    low, high = TESTED
    if not low <= _version(version) < high:
        window = f"{'.'.join(map(str, low))} up to {'.'.join(map(str, high))}"
        return f"aiohttp {version} is outside the tested window ({window}, not included)"
    missing: list[str] = []
    for module_name, names in _MODULE_NAMES.items():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{n}" for n in names.split() if not hasattr(module, n)]
    for (module_name, cls_name), names in _CLASS_NAMES.items():
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        if cls is None:
            missing.append(f"{module_name}.{cls_name}")
            continue
        missing += _missing(module_name, cls, names.split(), None)
    for (module_name, cls_name), names in _INIT_NAMES.items():
        cls = getattr(importlib.import_module(module_name), cls_name, None)
        if cls is None:
            missing.append(f"{module_name}.{cls_name}")
            continue
        try:  # the class and its aiohttp bases, where the attributes are assigned
            source = "".join(
                inspect.getsource(c)
                for c in inspect.getmro(cls)
                if c.__module__.startswith("aiohttp.")
            )
        except (TypeError, OSError):
            missing.append(f"{module_name}.{cls_name} (no source to check)")
            continue
        missing += _missing(module_name, cls, names.split(), source)
    if not _parser_takes_queue_size():
        missing.append("aiohttp.http.HttpRequestParser(max_msg_queue_size=...)")
    if missing:
        return f"aiohttp {version} lacks private names geoproxy uses: {', '.join(missing)}"
    return None


def _parser_takes_queue_size() -> bool:
    """The request parser is built the way ``fastlane.ProxyConnection`` builds one."""
    from aiohttp.http import HttpRequestParser

    loop = asyncio.new_event_loop()
    try:
        HttpRequestParser(
            None,
            loop,
            2**16,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=128,
            payload_exception=None,
            auto_decompress=False,
            max_msg_queue_size=32,
        )
    except TypeError:
        return False
    finally:
        loop.close()
    return True


@functools.cache
def decision() -> tuple[str, str | None]:
    """The mode this process runs in, decided once, and why when it is public: ``lean``
    unless ``GEOPROXY_AIOHTTP`` says ``public`` or ``probe()`` finds a reason."""
    if os.environ.get(ENV, "").strip().lower() == PUBLIC:
        return PUBLIC, f"{ENV}=public"
    reason = probe()
    return (LEAN, None) if reason is None else (PUBLIC, reason)


def mode() -> str:
    return decision()[0]


def lean() -> bool:
    return mode() == LEAN


def warn_if_public() -> None:
    """One WARNING naming why this process serves in public mode (the commands that
    serve call it once logging is set up)."""
    current, reason = decision()
    if current == PUBLIC:
        log.warning(
            "%s: serving through aiohttp's public API only (no fast lane, no lean "
            "upstream client; slower, and without the byte-for-byte guarantees: "
            "README, 'aiohttp versions')",
            reason,
        )
