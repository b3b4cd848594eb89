"""One response at a time adds to a shared conversation, across processes.

Within a process `Conversations.check_free` refuses a second response to a
conversation while one is being generated (400 `conversation_locked`, as OpenAI
answers). With Redis the conversation is shared, and a response in another process
would read it without the first's items and add its own before or between them. So
a process holds the conversation in Redis (`SharedHolds`) from before a create reads
it until the response's addition is written there, and a create in another process
meanwhile is refused as a second one here is:

* `claim` before the create reads the conversation (`Conversations.fresh`): the
  hold is taken in Redis (one round trip) unless this process has it already; the
  create is refused (`conversation_locked`) when another process still has it after
  `WAIT_SECONDS` (a response that just ended there holds it until its addition is
  written). Whoever claimed lets go (`release`) once the create started or was
  refused;
* the response holds it too (`adopt`, from `Conversations.take`) until it ends,
  and its addition until that is written (`Conversations.extend`): the hold is let
  go of when nothing here holds it any more.

A hold is a key set unless another process's token is there, with a lease
(`LEASE_SECONDS`) renewed every `RENEW_SECONDS` while held: a process that dies holds
nothing for longer than the lease. While Redis does not answer, a claim is a
retriable 503 and a hold is kept locally only (it expires in Redis; what is written
meanwhile goes after what another process added, as without holds); a hold that
expired so is taken again by the next renewal that can. A take or let-go whose
answer was lost may still run in Redis later: its token is let go of again at each
renewal for a lease, and this process replaces a token of its own it finds there.
A response started from a queue (a WebSocket create that waited behind its lane's
responses) adopts a hold nobody claimed for it: this takes it in Redis behind the
response's back, and only counts and logs a conflict when another process has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from warmsocket import errors

log = logging.getLogger("warmsocket.conversations")

LEASE_SECONDS = 20.0
"""How long a hold lasts in Redis unless renewed (a dead process's, at most)."""
RENEW_SECONDS = 5.0
"""Seconds between two renewals of this process's holds."""
WAIT_SECONDS = 1.0
"""How long a claim tries again while another process holds the conversation."""
RENEW_BATCH = 1000
"""Holds renewed by one script at most."""

Key = tuple[str, str]
"""(owner, conversation id)."""


class HoldBoard(Protocol):
    """Where holds are taken (`shared_conversations.SharedConversations`). Every call
    raises `engine.SharedStoreUnavailable` when Redis does not answer."""

    async def lock(self, owner: str, conv_id: str, token: str, lease_ms: int) -> bool: ...
    async def renew(self, held: list[tuple[str, str, str]], lease_ms: int) -> list[int]: ...
    async def unlock(self, owner: str, conv_id: str, token: str) -> None: ...


@dataclass(slots=True)
class _Hold:
    token: str
    refs: int
    """Claims, responses and unwritten additions holding it here."""
    taking: asyncio.Future[None] | None = None
    """Set while the hold is being taken in Redis (done when that is known)."""
    lost: bool = False
    """Another process holds it in Redis (`adopt` found it taken, or it expired):
    taken again by the next renewal or claim that can."""


class SharedHolds:
    """This process's holds on shared conversations."""

    def __init__(
        self,
        board: HoldBoard,
        *,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        wait_seconds: float = WAIT_SECONDS,
    ) -> None:
        self._board = board
        self._wait_seconds = wait_seconds
        self._lease_ms = round(lease_seconds * 1000)
        self._lease_seconds = lease_seconds
        self._renew_seconds = renew_seconds
        self._held: dict[Key, _Hold] = {}
        self._releasing: dict[Key, asyncio.Future[None]] = {}
        """Holds being let go of in Redis: a new one there waits for that."""
        self._doubtful: dict[tuple[Key, str], float] = {}
        """Tokens perhaps set in Redis (a take or let-go Redis did not answer: it may
        run what it was sent later), unlocked again at each renewal until their lease
        is surely over (monotonic time)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process = uuid.uuid4().hex[:16]
        self._tokens = itertools.count(1)
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        self.conflicts = 0
        """Holds found taken by another process without a claim to refuse (`adopt`),
        or lost while held (Redis did not renew them in time)."""

    def __len__(self) -> int:
        return len(self._held)

    def holds(self, owner: str, conv_id: str) -> bool:
        return (owner, conv_id) in self._held

    async def claim(self, owner: str, conv_id: str) -> None:
        """Hold the conversation (once more, if this process holds it already). Raises
        APIError (400 `conversation_locked`) when another process holds it,
        SharedStoreUnavailable when Redis does not answer."""
        self._loop = asyncio.get_running_loop()
        key = (owner, conv_id)
        while True:
            hold = self._held.get(key)
            if hold is not None and hold.taking is not None:
                await asyncio.wait([hold.taking])
                continue
            if hold is not None:
                if hold.lost and not await self._retake(key, hold):
                    raise errors.conversation_locked(conv_id)
                hold.refs += 1
                return
            releasing = self._releasing.get(key)
            if releasing is None:
                break
            await asyncio.wait([releasing])
        hold = self._held[key] = _Hold(self._new_token(), 1, self._loop.create_future())
        try:
            taken = await self._lock(owner, conv_id, hold.token, wait=True)
        except BaseException:
            # Redis may set it later (the call was sent): let go of it then too.
            self._doubt(key, hold.token)
            self._settled(hold)
            self._release(key, hold)
            raise
        self._settled(hold)
        if not taken:
            hold.lost = True
            self._release(key, hold)
            if self._held.get(key) is hold:
                self.conflicts += 1  # (a queued response adopted it meanwhile)
            raise errors.conversation_locked(conv_id)
        self._start_renewing()

    def adopt(self, owner: str, conv_id: str) -> None:
        """Hold the conversation once more: with a claim, at once; without one (a
        response started from a queue), taken in Redis in the background."""
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        key = (owner, conv_id)
        hold = self._held.get(key)
        if hold is not None:
            hold.refs += 1
            return
        hold = self._held[key] = _Hold(self._new_token(), 1, self._loop.create_future())
        self._spawn(self._take_unclaimed(key, hold))
        self._start_renewing()

    def release(self, owner: str, conv_id: str) -> None:
        """One holder fewer (`claim`, `adopt`); with none left the hold is let go of
        in Redis. From another thread (a response collected there), on the loop."""
        loop = self._loop
        if loop is not None and not _on(loop):
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.release, owner, conv_id)
            return
        key = (owner, conv_id)
        hold = self._held.get(key)
        if hold is not None:
            self._release(key, hold)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let go of every hold (shutdown: their additions were written or given up),
        waiting for Redis at most `timeout` seconds (the leases expire anyway)."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
        for key, hold in list(self._held.items()):
            del self._held[key]
            if not hold.lost:
                self._spawn(self._unlock(key, hold.token))
        for (key, token), _until in list(self._doubtful.items()):
            self._spawn(self._unlock(key, token))
        self._doubtful.clear()
        pending = [*self._tasks, *([self._renewer] if self._renewer is not None else [])]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=max(timeout, 0.0))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._renewer = None

    # -- in Redis -----------------------------------------------------------------------------

    def _new_token(self) -> str:
        return f"{self._process}:{next(self._tokens)}"

    def _release(self, key: Key, hold: _Hold) -> None:
        hold.refs -= 1
        if hold.refs > 0 or self._held.get(key) is not hold:
            return
        del self._held[key]
        if hold.lost or self._closed:
            return
        releasing = self._releasing[key] = asyncio.get_running_loop().create_future()

        def released(_task: asyncio.Task[None]) -> None:
            releasing.set_result(None)
            if self._releasing.get(key) is releasing:
                del self._releasing[key]

        self._spawn(self._unlock(key, hold.token)).add_done_callback(released)

    @staticmethod
    def _settled(hold: _Hold) -> None:
        taking, hold.taking = hold.taking, None
        if taking is not None and not taking.done():
            taking.set_result(None)

    def _doubt(self, key: Key, token: str) -> None:
        self._doubtful[(key, token)] = time.monotonic() + self._lease_seconds + 1.0
        self._start_renewing()

    async def _lock(self, owner: str, conv_id: str, token: str, *, wait: bool) -> bool:
        """Take the hold (or one of this process's own left in Redis, `_doubt`); while
        another process has it, try again for at most `self._wait_seconds` if `wait`:
        a response that just ended elsewhere holds it until its addition is written
        (milliseconds), and the client's next create, sent at once, is not refused
        for that."""
        deadline = time.monotonic() + (self._wait_seconds if wait else 0.0)
        pause = 0.01
        while not await self._board.lock(owner, conv_id, token, self._lease_ms):
            if time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        return True

    async def _retake(self, key: Key, hold: _Hold) -> bool:
        """Take a lost hold again in Redis, if no other process has it now."""
        owner, conv_id = key
        try:
            taken = await self._board.lock(owner, conv_id, hold.token, self._lease_ms)
        except Exception:
            return False  # (the board logged it)
        if taken:
            hold.lost = False
        return taken

    async def _take_unclaimed(self, key: Key, hold: _Hold) -> None:
        owner, conv_id = key
        try:
            releasing = self._releasing.get(key)
            if releasing is not None:
                await asyncio.wait([releasing])  # (this process's last one, let go of)
            if not await self._lock(owner, conv_id, hold.token, wait=True):
                hold.lost = True
                self.conflicts += 1
                log.warning(
                    "a queued response adds to a shared conversation another process "
                    "holds: the two responses' items may interleave",
                    extra={"conversation": conv_id},
                )
        except Exception:
            self._doubt(key, hold.token)  # (the board logged Redis's failure)
        finally:
            self._settled(hold)

    async def _unlock(self, key: Key, token: str) -> None:
        owner, conv_id = key
        try:
            await self._board.unlock(owner, conv_id, token)
        except Exception:
            self._doubt(key, token)  # (the board logged it; tried again, or it expires)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_renewing(self) -> None:
        if self._closed:
            return
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while self._held or self._doubtful:
            await asyncio.sleep(self._renew_seconds)
            await self._renew()
            await self._unlock_doubtful()

    async def _renew(self) -> None:
        holds = [(key, hold) for key, hold in self._held.items() if hold.taking is None]
        for key, hold in holds:
            if hold.lost and self._held.get(key) is hold:
                await self._retake(key, hold)
        holds = [(key, hold) for key, hold in holds if not hold.lost]
        for first in range(0, len(holds), RENEW_BATCH):
            batch = holds[first : first + RENEW_BATCH]
            held = [(owner, conv_id, hold.token) for (owner, conv_id), hold in batch]
            try:
                lost = await self._board.renew(held, self._lease_ms)
            except Exception:
                continue  # (logged by the board; renewed next time, if not expired)
            for index in lost:
                (_owner, conv_id), hold = batch[index]
                hold.lost = True
                self.conflicts += 1
                log.warning(
                    "a shared conversation's hold expired before it was let go of "
                    "(Redis did not renew it in time): another process may add to "
                    "the conversation meanwhile",
                    extra={"conversation": conv_id},
                )

    async def _unlock_doubtful(self) -> None:
        now = time.monotonic()
        for (key, token), until in list(self._doubtful.items()):
            if now > until:
                del self._doubtful[(key, token)]
                continue
            owner, conv_id = key
            held = self._held.get(key)
            if held is not None and held.token == token:
                continue  # (held again with it: a take whose answer was lost)
            with contextlib.suppress(Exception):
                await self._board.unlock(owner, conv_id, token)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
