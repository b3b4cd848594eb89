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

A hold is a key set only if absent, with a lease (`LEASE_SECONDS`) renewed every
`RENEW_SECONDS` while held: a process that dies holds nothing for longer than the
lease. While Redis does not answer, a claim is a retriable 503 and a hold is kept
locally only (it expires in Redis; what is written meanwhile goes after what another
process added, as without holds). A response started from a queue (a WebSocket lane
busy when its create came) adopts a hold nobody claimed for it: this takes it in
Redis behind the response's back, and only counts and logs a conflict when another
process has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

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
    lost: bool = False
    """Another process holds it in Redis (`adopt`, or it expired): not renewed."""


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
        self._renew_seconds = renew_seconds
        self._held: dict[Key, _Hold] = {}
        self._busy: dict[Key, asyncio.Future[None]] = {}
        """A hold being taken or let go of in Redis: the next claim waits for it."""
        self._process = uuid.uuid4().hex[:16]
        self._tokens = itertools.count(1)
        self._renewer: asyncio.Task[None] | None = None
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
        key = (owner, conv_id)
        while True:
            hold = self._held.get(key)
            if hold is not None:
                hold.refs += 1
                return
            busy = self._busy.get(key)
            if busy is None:
                break
            await asyncio.wait([busy])
        token = self._new_token()
        taking = self._begin(key)
        try:
            taken = await self._lock(owner, conv_id, token)
        except BaseException:
            # Redis may have set it before the answer was lost (or this was cancelled).
            self._end(key, taking)
            self._unlock_later(key, token)
            raise
        self._end(key, taking)
        if not taken:
            raise errors.conversation_locked(conv_id)
        self._held[key] = _Hold(token, 1)
        self._start_renewing()

    def adopt(self, owner: str, conv_id: str) -> None:
        """Hold the conversation once more: with a claim, at once; without one (a
        response started from a queue), taken in Redis in the background."""
        key = (owner, conv_id)
        hold = self._held.get(key)
        if hold is not None:
            hold.refs += 1
            return
        hold = self._held[key] = _Hold(self._new_token(), 1)
        taking = self._begin(key)
        task = asyncio.get_running_loop().create_task(self._take_unclaimed(key, hold))
        task.add_done_callback(lambda _task: self._end(key, taking))
        self._start_renewing()

    def release(self, owner: str, conv_id: str) -> None:
        """One holder fewer (`claim`, `adopt`); with none left the hold is let go of
        in Redis."""
        key = (owner, conv_id)
        hold = self._held.get(key)
        if hold is None:
            return
        hold.refs -= 1
        if hold.refs <= 0:
            del self._held[key]
            self._unlock_later(key, hold.token)

    async def aclose(self) -> None:
        """Let go of every hold (shutdown: their additions were written or given up)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for key, hold in list(self._held.items()):
            del self._held[key]
            self._unlock_later(key, hold.token)
        while self._busy:
            await asyncio.wait(list(self._busy.values()))

    # -- in Redis -----------------------------------------------------------------------------

    def _new_token(self) -> str:
        return f"{self._process}:{next(self._tokens)}"

    async def _lock(self, owner: str, conv_id: str, token: str) -> bool:
        """Take the hold; while another process has it, try again for at most
        `self._wait_seconds`: a response that just ended elsewhere holds it until its
        addition is written (milliseconds), and the client's next create, sent at
        once, is not refused for that."""
        deadline = time.monotonic() + self._wait_seconds
        pause = 0.01
        while not await self._board.lock(owner, conv_id, token, self._lease_ms):
            if time.monotonic() + pause > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        return True

    def _begin(self, key: Key) -> asyncio.Future[None]:
        busy = self._busy[key] = asyncio.get_running_loop().create_future()
        return busy

    def _end(self, key: Key, busy: asyncio.Future[None]) -> None:
        if not busy.done():
            busy.set_result(None)
        if self._busy.get(key) is busy:
            del self._busy[key]

    async def _take_unclaimed(self, key: Key, hold: _Hold) -> None:
        owner, conv_id = key
        with contextlib.suppress(Exception):  # (the board logged Redis's failure)
            if not await self._board.lock(owner, conv_id, hold.token, self._lease_ms):
                hold.lost = True
                self.conflicts += 1
                log.warning(
                    "a queued response adds to a shared conversation another process "
                    "holds: the two responses' items may interleave",
                    extra={"conversation": conv_id},
                )

    def _unlock_later(self, key: Key, token: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (a response collected off the loop, at exit: the hold expires)
        releasing = self._begin(key)
        task = loop.create_task(self._unlock(key, token))
        task.add_done_callback(lambda _task: self._end(key, releasing))

    async def _unlock(self, key: Key, token: str) -> None:
        owner, conv_id = key
        # Not let go of when Redis does not answer: it expires (the board logged it).
        with contextlib.suppress(Exception):
            await self._board.unlock(owner, conv_id, token)

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while self._held:
            await asyncio.sleep(self._renew_seconds)
            holds = [(key, hold) for key, hold in self._held.items() if not hold.lost]
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
