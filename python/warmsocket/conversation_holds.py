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
nothing for longer than the lease. Every call to Redis for one conversation is made
by one task at a time (`_work`), which decides what to do from the state after each
call: a hold let go of here while it was being taken is let go of in Redis once the
take answered, never before. While Redis does not answer, a claim is a retriable 503
and a hold is kept locally only (it expires in Redis; what is written meanwhile goes
after what another process added, as without holds); a hold that expired so is taken
again by the next renewal that can. A take or let-go whose answer was lost may still
run in Redis later: its token is let go of again at each renewal for a lease (the
hold goes on with a new token), and this process replaces a token of its own it
finds there. A response started from a queue (a WebSocket create that waited behind
its lane's responses) adopts a hold nobody claimed for it: this takes it in Redis
behind the response's back, and only counts and logs a conflict when another
process has it.
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


@dataclass(slots=True, eq=False)
class _Hold:
    token: str
    refs: int = 0
    """Claims, responses and unwritten additions holding it here."""
    held: bool = False
    """Redis has `token` (as of the last call that answered)."""
    take: bool = False
    """A take is asked of the worker (a claim waiting, a response without one)."""
    unclaimed: bool = False
    """Taken for a response nobody claimed it for (`adopt`): a conflict is counted."""
    failure: BaseException | None = None
    """Why the last take did not answer."""
    settled: asyncio.Event | None = None
    """Set (and replaced) each time a take answered or failed."""
    worker: asyncio.Task[None] | None = None


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
        self._doubtful: dict[tuple[Key, str], float] = {}
        """Tokens perhaps set in Redis (a take or let-go Redis did not answer: it may
        run what it was sent later), let go of again at each renewal until their lease
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
        """Conversations something here holds."""
        return sum(1 for hold in self._held.values() if hold.refs > 0)

    def holds(self, owner: str, conv_id: str) -> bool:
        hold = self._held.get((owner, conv_id))
        return hold is not None and hold.refs > 0

    async def claim(self, owner: str, conv_id: str) -> None:
        """Hold the conversation (once more, if this process holds it already). Raises
        APIError (400 `conversation_locked`) when another process holds it still after
        `WAIT_SECONDS`, SharedStoreUnavailable when Redis does not answer."""
        self._loop = asyncio.get_running_loop()
        key = (owner, conv_id)
        hold = self._hold(key)
        hold.refs += 1
        try:
            deadline = time.monotonic() + self._wait_seconds
            pause = 0.01
            while not hold.held:
                assert hold.settled is not None
                settled = hold.settled
                hold.take = True
                self._kick(key, hold)
                await settled.wait()
                if hold.held:
                    break
                if hold.failure is not None:
                    raise hold.failure
                if time.monotonic() + pause > deadline:
                    raise errors.conversation_locked(conv_id)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)
        except BaseException:
            self._let_go(key, hold)
            raise
        self._start_renewing()

    def adopt(self, owner: str, conv_id: str) -> None:
        """Hold the conversation once more: with a claim, at once; without one (a
        response started from a queue), taken in Redis in the background."""
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        key = (owner, conv_id)
        hold = self._hold(key)
        hold.refs += 1
        if not hold.held:
            hold.take = hold.unclaimed = True
            self._kick(key, hold)
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
            self._let_go(key, hold)

    async def settled(self) -> None:
        """Wait until no call to Redis is under way (as `Conversations` waits for its
        writes)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let go of every hold (shutdown: their additions were written or given up),
        waiting for Redis at most `timeout` seconds (the leases expire anyway)."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
        for key, hold in list(self._held.items()):
            self._kick(key, hold)  # (closed: it lets go of the hold, after a take)
        for (key, token), _until in list(self._doubtful.items()):
            self._spawn(self._unlock_quietly(key, token))
        self._doubtful.clear()
        pending = [*self._tasks, *([self._renewer] if self._renewer is not None else [])]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=max(timeout, 0.0))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._renewer = None

    # -- the worker: every Redis call for one conversation, one at a time ---------------------

    def _hold(self, key: Key) -> _Hold:
        hold = self._held.get(key)
        if hold is None:
            hold = self._held[key] = _Hold(self._new_token(), settled=asyncio.Event())
        return hold

    def _new_token(self) -> str:
        return f"{self._process}:{next(self._tokens)}"

    def _let_go(self, key: Key, hold: _Hold) -> None:
        hold.refs -= 1
        if hold.refs <= 0:
            hold.take = False
            self._kick(key, hold)

    def _kick(self, key: Key, hold: _Hold) -> None:
        """Have the worker bring Redis in line with the hold (once it is done with
        the call it is making, if any)."""
        if hold.worker is None or hold.worker.done():
            hold.worker = self._spawn(self._work(key, hold))

    async def _work(self, key: Key, hold: _Hold) -> None:
        owner, conv_id = key
        while True:
            wanted = hold.refs > 0 and not self._closed
            if wanted and hold.take and not hold.held:
                hold.take = False
                token = hold.token
                try:
                    taken = await self._board.lock(owner, conv_id, token, self._lease_ms)
                except Exception as exc:  # (SharedStoreUnavailable; the board logged it)
                    self._doubt(key, token)
                    hold.token = self._new_token()
                    hold.failure = exc
                else:
                    hold.held, hold.failure = taken, None
                    if taken:
                        hold.unclaimed = False
                    elif hold.unclaimed:
                        hold.unclaimed = False
                        self._conflict(
                            "a queued response adds to a shared conversation another "
                            "process holds: the two responses' items may interleave",
                            conv_id,
                        )
                self._settle(hold)
                continue
            if not wanted and hold.held:
                # Not held from here on: a claim meanwhile takes it again after this.
                token, hold.held = hold.token, False
                try:
                    await self._board.unlock(owner, conv_id, token)
                except Exception:
                    self._doubt(key, token)  # (tried again at the renewals, or it expires)
                    hold.token = self._new_token()
                continue
            if not wanted and self._held.get(key) is hold:
                del self._held[key]
                self._settle(hold)  # (no claim waits on it now: refs are 0)
                if not self._held and not self._doubtful and self._renewer is not None:
                    self._renewer.cancel()  # (nothing to renew: not left sleeping)
                    self._renewer = None
            return

    @staticmethod
    def _settle(hold: _Hold) -> None:
        settled, hold.settled = hold.settled, asyncio.Event()
        if settled is not None:
            settled.set()

    def _conflict(self, message: str, conv_id: str) -> None:
        self.conflicts += 1
        log.warning(message, extra={"conversation": conv_id})

    def _doubt(self, key: Key, token: str) -> None:
        self._doubtful[(key, token)] = time.monotonic() + self._lease_seconds + 1.0
        self._start_renewing()

    async def _unlock_quietly(self, key: Key, token: str) -> None:
        owner, conv_id = key
        with contextlib.suppress(Exception):  # (the board logged it; it expires)
            await self._board.unlock(owner, conv_id, token)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- renewals ------------------------------------------------------------------------

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
        for key, hold in list(self._held.items()):
            if hold.refs > 0 and not hold.held:
                hold.take = True  # (lost, or never taken: taken again if it can be)
                self._kick(key, hold)
        holds = [(key, hold, hold.token) for key, hold in self._held.items() if hold.held]
        for first in range(0, len(holds), RENEW_BATCH):
            batch = holds[first : first + RENEW_BATCH]
            held = [(owner, conv_id, token) for (owner, conv_id), _hold, token in batch]
            try:
                lost = await self._board.renew(held, self._lease_ms)
            except Exception:
                continue  # (logged by the board; renewed next time, if not expired)
            for index in lost:
                (_owner, conv_id), hold, token = batch[index]
                if hold.held and hold.token == token and hold.refs > 0:
                    hold.held = False
                    self._conflict(
                        "a shared conversation's hold expired before it was let go of "
                        "(Redis did not renew it in time): another process may add to "
                        "the conversation meanwhile",
                        conv_id,
                    )

    async def _unlock_doubtful(self) -> None:
        now = time.monotonic()
        for (key, token), until in list(self._doubtful.items()):
            if now > until:
                del self._doubtful[(key, token)]
                continue
            await self._unlock_quietly(key, token)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
