"""What one process tells all the others through Redis: a shared response was deleted
(drop your copy), a background response is to be cancelled (cancel it if you run it).

The announcements go into one Redis stream, ``<prefix>:announced`` (entries
``{"k": "deleted" | "cancel", "o": owner, "id": response id}``, the newest
`KEEP` kept), which every process reads from where it stopped. Pub/sub, used before,
loses what is published while a subscriber reconnects (a Redis restart, a failover, a
network blip): a deletion missed so would have left that process serving a response
its owner deleted, for as long as its cache kept it. A stream is read again from the
last entry read, so nothing is missed unless more than `KEEP` announcements were made
while a process could not read (logged and counted, on Redis 7), or the stream is
gone (a Redis that restarted empty). Then `follow` calls its `missed`: the shared store
checks every response its process caches against the records in Redis, and drops
those deleted meanwhile.

The same announcements are still published on the channels ``<prefix>:deleted`` and
``<prefix>:cancel``, for processes of earlier versions during a rolling upgrade.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("warmsocket.shared_store")

KEEP = 100_000
"""Announcements kept in the stream (about 100 bytes each)."""
READ_BLOCK_MS = 1000
"""How long one read waits for new announcements."""
READ_BATCH = 256
STALL_SECONDS = 5.0
"""Seconds a read may take past its block before the position is checked (the
process was paused, or its event loop held up: announcements may have been trimmed)."""
RETRY_DELAY = 1.0
"""Seconds between two tries to read while Redis does not answer."""

Heard = Callable[[str, str, str], None]
"""Called with (kind, owner, response id) for each announcement."""
Missed = Callable[[], Awaitable[bool]]
"""Called when announcements may have been missed; returns whether it caught up (else
it is called again after the next read)."""
Failed = Callable[[BaseException], dict[str, str]]
"""The log fields of a failed Redis call (`shared_store.failure_fields`)."""

KINDS = ("deleted", "cancel")


class Announcements:
    """The announcement stream of one `--redis-prefix`."""

    def __init__(self, client: Any, prefix: str, *, address: str, failure_fields: Failed) -> None:
        self._client = client
        self.key = f"{prefix}:announced"
        self._channels = {"deleted": f"{prefix}:deleted", "cancel": f"{prefix}:cancel"}
        self._address = address
        self._failure_fields = failure_fields
        self.position = "0-0"
        """The id of the last entry read (or of the stream's end when following began)."""
        self._added_before: int | None = 0
        """The stream's count of entries ever added when `position` was set."""
        self._read = 0
        """Entries read since."""
        self.errors = 0
        self.missed = 0
        """Times announcements were trimmed from the stream before this process read
        them."""
        self._catch_up = False
        """Whether announcements may have been missed and `missed` has not yet caught up."""
        self._catch_up_at = 0.0
        """When `missed` may be tried again (the event loop's clock)."""

    async def announce(self, kind: str, owner: str, response_id: str) -> None:
        """Tell every process. Raises Redis and OS errors."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xadd(
                self.key,
                {"k": kind, "o": owner, "id": response_id},
                maxlen=KEEP,
                approximate=True,
            )
            pipe.publish(self._channels[kind], json.dumps([owner, response_id]))
            await pipe.execute()

    async def begin(self) -> None:
        """Follow from the stream's end as it is now (what was announced before is in
        the records: loads look at them); from Redis's clock when there is no stream
        (a millisecond early: hearing an older announcement does no harm). Raises
        Redis and OS errors."""
        if await self._client.exists(self.key):
            info = await self._client.xinfo_stream(self.key)
            self.position = _text(info["last-generated-id"])
            self._added_before = info.get("entries-added")  # (Redis 7)
        else:
            seconds, microseconds = await self._client.time()
            self.position = f"{max(int(seconds) * 1000 + int(microseconds) // 1000 - 1, 0)}-0"
            self._added_before = 0
        self._read = 0

    async def follow(
        self, heard: Heard, missed: Missed | None = None, *, check_first: bool = False
    ) -> None:
        """Read the announcements from `position` on, for ever (cancel to stop), and
        call `heard` with each; while Redis does not answer, try again every second.
        When announcements may have been missed (the stream was trimmed past `position`,
        or is gone), and first with `check_first`, await `missed` once Redis answers,
        until it returns True (at most once a second)."""
        loop = asyncio.get_running_loop()
        failing = False
        # Whether the last read was a whole batch: more wait, perhaps more than the
        # stream keeps.
        behind = False
        self._catch_up = self._catch_up or check_first
        # Whether the last read took far longer than it blocks: the process was paused
        # or its event loop held up, and more may have been announced meanwhile than
        # the stream keeps.
        stalled = False
        while True:
            try:
                if (failing or behind or stalled) and await self._check_position():
                    self._catch_up = True
                asked = loop.time()
                read = await self._read_some(heard)
                stalled = loop.time() - asked > READ_BLOCK_MS / 1000 + STALL_SECONDS
                if failing:
                    log.info("following Redis deletions and cancels again")
                    failing = False
                behind = read >= READ_BATCH
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis and OS errors, and anything else: keep reading
                self.errors += 1
                if not failing:  # once per outage, not once per try
                    log.error(
                        "cannot read Redis deletions and cancels; trying again every second",
                        extra={"redis": self._address, **self._failure_fields(exc)},
                    )
                    failing = True
                await asyncio.sleep(RETRY_DELAY)
                continue
            if self._catch_up and missed is not None and loop.time() >= self._catch_up_at:
                try:
                    caught_up = await missed()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # its own failure, not Redis's: logged, tried again
                    log.error(
                        "cannot check what announcements were missed",
                        extra={"error_type": type(exc).__name__},
                    )
                    caught_up = False
                self._catch_up = not caught_up
                if not caught_up:
                    self._catch_up_at = loop.time() + RETRY_DELAY

    async def _read_some(self, heard: Heard) -> int:
        """Read the announcements after `position` (waiting up to `READ_BLOCK_MS` for
        one), and call `heard` with each; how many were read. (A call of its own:
        nothing of them is held while the next read waits.)"""
        reply = await self._client.xread(
            {self.key: self.position}, count=READ_BATCH, block=READ_BLOCK_MS
        )
        read = 0
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                self.position = _text(entry_id)
                self._read += 1
                read += 1
                self._hear(fields, heard)
        return read

    async def _newest(self) -> str | None:
        newest = await self._client.xrevrange(self.key, count=1)
        return _text(newest[0][0]) if newest else None

    async def _check_position(self) -> bool:
        """After an outage, or while far behind: a stream gone, started again behind
        `position` or counting fewer entries ever added than were seen (Redis restarted
        empty, then took new announcements) is read from its start; entries after
        `position` trimmed before they were read are logged and counted (on Redis 7,
        whose count of the entries ever added tells), and counted once. Returns
        whether announcements may have been missed."""
        if not await self._client.exists(self.key):
            self._restart(None)
            return True
        info = await self._client.xinfo_stream(self.key)
        if _id(_text(info["last-generated-id"])) < _id(self.position):
            self._restart(info)
            return True
        added = info.get("entries-added")
        first = info.get("first-entry")
        if added is None or self._added_before is None or not first:
            return False
        if int(added) < self._added_before + self._read:
            self._restart(info)  # a stream of its own, begun since
            return True
        if _id(_text(first[0])) <= _id(self.position):
            return False  # nothing after `position` was trimmed
        length = int(info["length"])
        unread = int(added) - self._added_before - self._read
        if unread <= length:
            return False
        self.missed += 1
        log.error(
            "Redis deletions and cancels were dropped before this process read them; "
            "checking the responses this process caches against Redis",
            extra={"redis": self._address, "missed": unread - length},
        )
        # Counted once: what follows `position` from here on is read or checked.
        self._added_before = int(added) - length
        self._read = 0
        return True

    def _restart(self, info: dict[str, Any] | None) -> None:
        """Read the stream (as `info` describes it, if it exists) from its start."""
        self.position = "0-0"
        added = None if info is None else info.get("entries-added")
        self._added_before = (
            0 if info is None or added is None else int(added) - int(info["length"])
        )
        self._read = 0

    def _hear(self, fields: dict[Any, Any], heard: Heard) -> None:
        try:
            kind = _text(fields[b"k"] if b"k" in fields else fields["k"])
            owner = _text(fields[b"o"] if b"o" in fields else fields["o"])
            response_id = _text(fields[b"id"] if b"id" in fields else fields["id"])
        except (KeyError, UnicodeDecodeError) as exc:
            self.errors += 1
            log.error("bad announcement", extra={"error_type": type(exc).__name__})
            return
        if kind not in KINDS:
            return  # (a kind of a later version)
        try:
            heard(kind, owner, response_id)
        except Exception as exc:
            log.error(
                "cannot act on an announcement",
                extra={"kind": kind, "error_type": type(exc).__name__},
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
