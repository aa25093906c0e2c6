"""Asynchronous replication: every stamp pushes its own changes to every peer, from the
durable change log, in order, with a per-peer cursor.

A push is idempotent (applying a change twice is a no-op), so retrying it is always safe:
aiohttp-retry retries one push a few times with jittered backoff, and the peer loop backs
off exponentially (with jitter, capped) while a peer stays unreachable. A peer that was down
catches up from the log when it returns; a stamp that restarts resumes from its cursors.
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

from geoproxy.stamp.config import Peer, StampConfig
from geoproxy.stamp.store import Change, Store

log = logging.getLogger("geoproxy.stamp.replication")
PUSH_PATH = "/replication/changes"
#: One push carries at most about this much: well under what a peer accepts in one request
#: (64 MiB), however many changes ``batch_size`` allows. A value is at most 1 MiB, so a
#: single change always fits, and a backlog of large values drains batch by batch.
MAX_PUSH_BYTES = 8 * 1024 * 1024


class PushError(Exception):
    """A peer did not take a batch."""


class Replicator:
    def __init__(
        self,
        store: Store,
        config: StampConfig,
        session: aiohttp.ClientSession,
        on_push: Callable[[str, str], None] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.config = config
        self.peers = config.peers
        self._wake = {p.name: asyncio.Event() for p in config.peers}
        self._on_push = on_push or (lambda peer, result: None)
        self._rand = rand
        rep = config.replication
        self._client = RetryClient(
            client_session=session,
            retry_options=JitterRetry(
                attempts=3, start_timeout=rep.min_backoff, max_timeout=rep.max_backoff,
                methods={"POST"}, exceptions={aiohttp.ClientError, TimeoutError},
                random_interval_size=rep.min_backoff,
            ),
        )  # fmt: skip

    def notify(self) -> None:
        """A local write happened: push it now rather than at the next interval."""
        for event in self._wake.values():
            event.set()

    async def push(self, peer: Peer, changes: Iterable[Change]) -> dict[str, Any]:
        """Send changes to one peer; its answer (applied/ignored counts) or PushError."""
        body = {"from": self.config.name, "changes": [c.as_dict() for c in changes]}
        # A payload that retries can send again from its start and that is written in
        # chunks (aiohttp warns that a raw body over 1 MiB would hold up the event loop).
        data = BytesIOPayload(io.BytesIO(json.dumps(body).encode()),
                              content_type="application/json")  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=self.config.replication.timeout)
        url = peer.url.with_path(PUSH_PATH)
        try:
            async with self._client.post(url, data=data, timeout=timeout) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise PushError(f"{peer.name} answered {resp.status}: {text}")
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
            self.store.cursor(peer.name), self.config.replication.batch_size,
            origin=self.config.name,
        )  # fmt: skip
        if not batch:
            return 0
        size = 0
        for n, (_, change) in enumerate(batch):
            size += len(change.value or "") + 200  # the value, and the rest of the change
            if size > MAX_PUSH_BYTES and n > 0:
                batch = batch[:n]
                break
        await self.push(peer, (c for _, c in batch))
        self.store.set_cursor(peer.name, batch[-1][0])
        return len(batch)

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
                log.info("replication to %s failed (%s); retrying in %.2fs", peer.name, exc,
                         delay)  # fmt: skip
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
