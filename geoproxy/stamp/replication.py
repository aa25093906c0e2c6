"""Asynchronous replication: every stamp pushes its own changes to every peer, from the
durable change log, in order, with a per-peer cursor.

A push is idempotent (applying a change twice is a no-op), so retrying it is always safe:
aiohttp-retry retries one push a few times with jittered backoff, and the peer loop backs
off exponentially (with jitter, capped) while a peer stays unreachable. A peer that was down
catches up from the log when it returns; a stamp that restarts resumes from its cursors.

Every push is signed with the fleet's secret (``auth``). A peer that refuses a batch for
good (400, 413, 422: it can never take it) gets its changes again one at a time, and a
change refused alone is parked in the dead-letter table, so one poison change never stops
the rest. Anything else (401, 5xx, no answer) is retried: it may pass later.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp.payload import BytesIOPayload
from aiohttp_retry import JitterRetry, RetryClient

from geoproxy.stamp import auth
from geoproxy.stamp.config import Peer, StampConfig
from geoproxy.stamp.store import Change, Store

log = logging.getLogger("geoproxy.stamp.replication")
PUSH_PATH = "/replication/changes"
#: One push carries at most about this much: well under what a peer accepts in one request
#: (16 MiB), however many changes ``batch_size`` allows. A value is at most 1 MiB, so a
#: single change always fits, and a backlog of large values drains batch by batch.
MAX_PUSH_BYTES = 8 * 1024 * 1024
#: Answers that mean the peer will never take this batch as it is.
PERMANENT = frozenset({400, 413, 422})


class PushError(Exception):
    """A peer did not take a batch."""


class Refused(PushError):
    """A peer answered that it will never take this batch (a status in PERMANENT)."""


class Replicator:
    def __init__(
        self,
        store: Store,
        config: StampConfig,
        session: aiohttp.ClientSession,
        on_push: Callable[[str, str], None] | None = None,
        rand: Callable[[], float] = random.random,
        on_park: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.peers = config.peers
        self._wake = {p.name: asyncio.Event() for p in config.peers}
        self._on_push = on_push or (lambda peer, result: None)
        self._on_park = on_park or (lambda peer: None)
        self._rand = rand
        rep = config.replication
        self._client = RetryClient(
            client_session=session,
            retry_options=JitterRetry(
                attempts=3,
                start_timeout=rep.min_backoff,
                max_timeout=rep.max_backoff,
                methods={"POST"},
                exceptions={aiohttp.ClientError, TimeoutError},
                random_interval_size=rep.min_backoff,
            ),
        )

    def notify(self) -> None:
        """A local write happened: push it now rather than at the next interval."""
        for event in self._wake.values():
            event.set()

    async def push(self, peer: Peer, changes: Iterable[Change]) -> dict[str, Any]:
        """Send changes to one peer; its answer (applied/ignored counts) or PushError."""
        try:
            body = {"from": self.config.name, "changes": [c.as_dict() for c in changes]}
            raw = json.dumps(body).encode()
        except (RecursionError, ValueError) as exc:  # a value no peer could parse either
            raise Refused(f"cannot encode the batch for {peer.name}: {exc}") from None
        # A payload that retries can send again from its start and that is written in
        # chunks (aiohttp warns that a raw body over 1 MiB would hold up the event loop).
        data = BytesIOPayload(io.BytesIO(raw), content_type="application/json")
        timeout = aiohttp.ClientTimeout(total=self.config.replication.timeout)
        url = peer.url.with_path(PUSH_PATH)
        headers = auth.sign(
            self.config.secret or b"", self.config.name, "POST", url.raw_path_qs, raw
        )
        try:
            async with self._client.post(url, data=data, timeout=timeout, headers=headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    error = Refused if resp.status in PERMANENT else PushError
                    raise error(f"{peer.name} answered {resp.status}: {text}")
                answer: dict[str, Any] = await resp.json()
                return answer
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PushError(f"{peer.name}: {type(exc).__name__}: {exc}") from None

    async def push_to_all(self, change: Change) -> tuple[list[str], dict[str, str]]:
        """Push one change to every peer at once (a sync write): (acked, failed: reason).
        Cursors are left alone; the asynchronous loop re-sends it harmlessly."""
        results = await asyncio.gather(
            *(self.push(p, [change]) for p in self.peers), return_exceptions=True
        )
        acked, failed = [], {}
        for peer, result in zip(self.peers, results, strict=True):
            if isinstance(result, BaseException):
                failed[peer.name] = str(result)
            else:
                acked.append(peer.name)
        return acked, failed

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for peer in self.peers:
                group.create_task(self._peer_loop(peer), name=f"replicate:{peer.name}")

    async def push_once(self, peer: Peer) -> int:
        """One batch from the cursor to a peer; the number of changes it acknowledged."""
        batch = self.store.changes_since(
            self.store.cursor(peer.name),
            self.config.replication.batch_size,
            origin=self.config.name,
            max_bytes=MAX_PUSH_BYTES,
        )
        if not batch:
            return 0
        try:
            await self.push(peer, (c for _, c in batch))
        except Refused as exc:
            if len(batch) == 1:
                self._park(peer, batch[0][1], str(exc))
            else:  # find the change it cannot take: each on its own
                log.warning(
                    "%s refused a batch of %d changes (%s); sending them one at a time",
                    peer.name,
                    len(batch),
                    exc,
                )
                for seq, change in batch:
                    try:
                        await self.push(peer, [change])
                    except Refused as one:
                        self._park(peer, change, str(one))
                    self.store.set_cursor(peer.name, seq)
        self.store.set_cursor(peer.name, batch[-1][0])
        return len(batch)

    def _park(self, peer: Peer, change: Change, reason: str) -> None:
        """A change the peer will never take: into the dead-letter table, and move on."""
        log.error(
            "replication to %s: %s refused change %s of %r for good (%s); parked in "
            "the dead-letter table",
            peer.name,
            peer.name,
            change.version.encode(),
            change.id,
            reason,
        )
        self.store.quarantine("sent", peer.name, [(_raw(change), reason)])
        self._on_park(peer.name)

    async def _peer_loop(self, peer: Peer) -> None:
        rep = self.config.replication
        backoff = rep.min_backoff
        wake = self._wake[peer.name]
        while True:
            wake.clear()
            try:
                sent = await self.push_once(peer)
            except PushError as exc:
                self._on_push(peer.name, "error")
                delay = backoff * (0.5 + self._rand())  # jitter: 0.5x to 1.5x
                log.info("replication to %s failed (%s); retrying in %.2fs", peer.name, exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, rep.max_backoff)
                continue
            except Exception:  # a bug must not end replication for good
                log.exception("replication to %s failed unexpectedly", peer.name)
                await asyncio.sleep(rep.max_backoff)
                continue
            backoff = rep.min_backoff
            if sent:
                self._on_push(peer.name, "ok")
                continue  # there may be more
            try:
                async with asyncio.timeout(rep.interval):
                    await wake.wait()
            except TimeoutError:
                pass


def _raw(change: Change) -> str:
    """A change as JSON text, its value spliced in as stored (it may be past parsing)."""
    head = json.dumps(
        {
            "kind": change.kind,
            "id": change.id,
            "deleted": change.deleted,
            "version": change.version.encode(),
            "region": change.region,
        }
    )
    return f'{head[:-1]}, "value": {change.value or "null"}}}'
