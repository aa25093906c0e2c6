"""The stamp's peer listener (``listen.peer``): replication between stamps, and what an
operator reads. Bind it to a private address: it is never behind the edge proxy.

    POST /replication/changes         a peer pushes a batch of its own changes   (signed)
    GET  /replication/changes?since=&limit=&origin=   pull changes after a cursor (signed)
    GET  /events?since=&limit=        the ordered change log (local order)
    GET  /dead-letters?since=&limit=  changes refused or parked, with the reason
    GET  /health, GET /metrics

A signed request must come from a configured peer (``auth``); with mutual TLS, over a
client certificate that names it (``tls``). Within a pushed batch, each
change must be the sending peer's own (its version's origin), well formed, within the
bounds of the public API and not further ahead of this stamp's clock than
``max_clock_skew``; the valid ones apply, the others go to the dead-letter table, and the
answer says how many: one poison change never blocks the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from geoproxy.proxy.responses import json_error
from geoproxy.stamp import auth, values
from geoproxy.stamp.hlc import Version
from geoproxy.stamp.state import STATE, BadRequest, int_query, parts, read_body
from geoproxy.stamp.store import COUNTER, INT64_MAX, ITEM, ROW_OVERHEAD, Change
from geoproxy.stamp.tls import certificate_names, peer_mismatch

log = logging.getLogger("geoproxy.stamp")

MAX_BATCH_BYTES = 16 * 1024 * 1024  # one replication push (a sender here sends <= 9 MiB)
MAX_BATCH = 10_000
#: One page of /events or of a pull holds about this much at most, whatever its limit.
PAGE_BYTES = 4 * 1024 * 1024
#: A pushed body larger than this is parsed and checked on a worker thread, so that the
#: event loop keeps serving meanwhile.
OFF_LOOP_BYTES = 256 * 1024
#: A pushed batch applies in transactions of about this much (values), one at a time.
APPLY_BYTES = 1024 * 1024


def authenticate(request: web.Request) -> tuple[str, str]:
    """The peer that sent the request and the body digest it sent; 401 (counted and
    logged, never with the secret) otherwise. The shared secret's signature, and with
    mutual TLS the client certificate, which must name that peer."""
    config = request.app[STATE].config
    peers = {p.name: p for p in config.peers}
    mutual = config.tls is not None and config.tls.mutual
    try:
        if config.secret is None and mutual:
            peer, digest = auth.claimed(peers, request.headers)
        else:
            peer, digest = auth.verify(
                config.secret,
                peers,
                config.auth_window,
                request.method,
                request.rel_url.raw_path_qs,
                request.headers,
            )
        if mutual:
            transport = request.transport
            names = certificate_names(transport.get_extra_info("peercert") if transport else None)
            if (why := peer_mismatch(peer, names)) is not None:
                raise auth.AuthError("certificate_mismatch", why)
        return peer, digest
    except auth.AuthError as exc:
        raise _unauthenticated(request, exc) from None


def _unauthenticated(request: web.Request, exc: auth.AuthError) -> BadRequest:
    _, metrics, _ = parts(request)
    metrics.auth_failures.labels(exc.reason).inc()
    log.warning(
        "refused %s %s from %s: not an authenticated peer (%s: %s)",
        request.method,
        request.path,
        request.remote,
        exc.reason,
        exc.message,
    )
    return BadRequest(401, "unauthenticated", f"not an authenticated peer: {exc.message}")


async def push_changes(request: web.Request) -> web.Response:
    store, metrics, _ = parts(request)
    config = request.app[STATE].config
    peer, digest = authenticate(request)
    raw = await read_body(request, MAX_BATCH_BYTES)
    try:
        auth.check_body(digest, raw)
    except auth.AuthError as exc:
        raise _unauthenticated(request, exc) from None
    now_ms = store.clock.physical()
    skew_ms = int(config.max_clock_skew * 1000)
    try:
        if len(raw) > OFF_LOOP_BYTES:
            good, bad = await asyncio.to_thread(parse_batch, raw, peer, now_ms, skew_ms)
        else:
            good, bad = parse_batch(raw, peer, now_ms, skew_ms)
    except (BadRequest, values.BadValue):
        metrics.apply_errors.inc()
        raise
    applied = ignored = conflicts = 0
    try:
        for part in _slices(good):
            result = store.apply(part)
            applied, ignored = applied + result.applied, ignored + result.ignored
            conflicts += result.conflicts
            await asyncio.sleep(0)  # let other requests in between slices
    except Exception:
        metrics.apply_errors.inc()
        log.exception("applying a batch from %s failed", peer)
        return json_error(
            500,
            "apply_failed",
            "batch not (wholly) applied (this stamp's log says why); the sender sends it again",
        )
    if bad:
        store.quarantine("received", peer, [(text, reason) for text, _, reason in bad])
        for _, code, _ in bad:
            metrics.quarantined.labels("received", code).inc()
        log.warning(
            "quarantined %d of %d changes from %s (GET /dead-letters); the first: %s",
            len(bad),
            len(bad) + len(good),
            peer,
            bad[0][2],
        )
    metrics.applied.labels("applied").inc(applied)
    metrics.applied.labels("ignored").inc(ignored)
    metrics.conflicts.inc(conflicts)
    return web.json_response(
        {"applied": applied, "ignored": ignored, "conflicts": conflicts, "quarantined": len(bad)}
    )


def _slices(changes: list[Change]) -> Iterator[list[Change]]:
    """The batch in slices of about APPLY_BYTES, each one transaction: a large batch does
    not hold up the event loop for its whole length. Each change applies on its own
    merits (last-write-wins, per-slot maximum), so slices may commit apart: a batch cut
    short by a crash is sent again whole, and what had applied is ignored the second time."""
    part: list[Change] = []
    size = 0
    for change in changes:
        part.append(change)
        size += len(change.value or "") + ROW_OVERHEAD
        if size >= APPLY_BYTES:
            yield part
            part, size = [], 0
    if part:
        yield part


#: A change refused: (its JSON text, reason code for the metric, reason for people).
Refusal = tuple[str, str, str]


def parse_batch(
    raw: bytes, peer: str, now_ms: int, skew_ms: int
) -> tuple[list[Change], list[Refusal]]:
    """The valid changes of a pushed batch, and the refused ones with why. A body that is
    not a batch at all is a 400 (BadRequest, BadValue)."""
    body = values.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get("changes"), list):
        raise BadRequest(400, "bad_batch", 'body must be {"from": ..., "changes": [...]}')
    batch = body["changes"]
    if len(batch) > MAX_BATCH:
        raise BadRequest(400, "bad_batch", f"at most {MAX_BATCH} changes per batch")
    good: list[Change] = []
    bad: list[Refusal] = []
    for i, c in enumerate(batch):
        try:
            good.append(_change(c, peer, now_ms, skew_ms))
        except _Refused as exc:
            bad.append((json.dumps(c), exc.code, f"changes[{i}]: {exc}"))
    return good, bad


class _Refused(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _change(c: Any, peer: str, now_ms: int, skew_ms: int) -> Change:
    """One pushed change, checked; _Refused naming what is wrong with it."""
    try:
        kind, id, deleted = c["kind"], c["id"], c["deleted"]
        version = Version.decode(c["version"])
        region, value = c["region"], c["value"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _Refused("invalid", f"invalid change ({exc})") from None
    if kind not in (ITEM, COUNTER) or not isinstance(id, str) or not values.ID.match(id):
        raise _Refused("invalid", "invalid change (kind or id)")
    if not isinstance(deleted, bool) or not isinstance(region, str) or not region:
        raise _Refused("invalid", "invalid change (deleted or region)")
    if version.origin != peer:
        raise _Refused(
            "wrong_origin",
            f"origin {version.origin!r} is not the sending peer "
            f"{peer!r} (a stamp sends only its own changes)",
        )
    if version.wall > now_ms + skew_ms:
        raise _Refused(
            "clock_skew",
            f"version {version.encode()} is "
            f"{(version.wall - now_ms) / 1000:.0f}s ahead of this stamp's clock, "
            f"more than max_clock_skew ({skew_ms / 1000:g}s)",
        )
    if kind == COUNTER:
        ok = (
            isinstance(value, dict)
            and set(value) == {"p", "n"}
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX
                for v in value.values()
            )
        )
        if not ok or deleted:
            raise _Refused(
                "invalid",
                f'invalid change (counter value: {{"p": n, "n": n}}, 0 <= n <= {INT64_MAX})',
            )
    if deleted and value is not None:  # a live item's value may be JSON null
        raise _Refused("invalid", "invalid change (a delete carries a value)")
    try:
        values.check(value)
    except values.BadValue as exc:
        raise _Refused("invalid", f"invalid change ({exc.message})") from None
    text = None if deleted else json.dumps(value, separators=(",", ":"))
    if text is not None and len(text) > MAX_VALUE_TEXT:
        raise _Refused("invalid", f"invalid change (value over {MAX_VALUE_TEXT} bytes)")
    return Change(kind, id, text, deleted, version, region)


#: A value as stored, at most (the public API's 1 MiB body, re-encoded compactly).
MAX_VALUE_TEXT = 1024 * 1024


async def pull_changes(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    peer, digest = authenticate(request)
    try:
        auth.check_body(digest, await read_body(request, 0))
    except auth.AuthError as exc:
        raise _unauthenticated(request, exc) from None
    since = int_query(request, "since", 0, 0, 2**62)
    limit = int_query(request, "limit", 500, 1, MAX_BATCH)
    origin = request.query.get("origin") or None
    batch = store.changes_since(since, limit, origin=origin, max_bytes=PAGE_BYTES)
    log.debug("%s pulled %d changes after %d", peer, len(batch), since)
    return web.json_response(
        {
            "changes": [c.as_dict() for _, c in batch],
            "next_since": batch[-1][0] if batch else since,
        }
    )


def _log_page(request: web.Request, key: str, fetch: Any) -> web.Response:
    """One page of a log after ``?since=`` (``fetch(since, limit)`` -> [(seq, entry)])."""
    since = int_query(request, "since", 0, 0, 2**62)
    page = fetch(since, int_query(request, "limit", 100, 1, 1000))
    return web.json_response(
        {key: [entry for _, entry in page], "next_since": page[-1][0] if page else since}
    )


async def events(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    return _log_page(
        request,
        "events",
        lambda since, limit: [
            (seq, {"seq": seq, **c.as_dict()})
            for seq, c in store.changes_since(since, limit, max_bytes=PAGE_BYTES)
        ],
    )


async def dead_letters(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    return _log_page(
        request,
        "dead_letters",
        lambda since, limit: [(d.seq, d.as_dict()) for d in store.dead_letters(since, limit)],
    )


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[STATE].registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/replication/changes", push_changes)
    app.router.add_get("/replication/changes", pull_changes)
    app.router.add_get("/events", events)
    app.router.add_get("/dead-letters", dead_letters)
    app.router.add_get("/metrics", metrics_handler)
