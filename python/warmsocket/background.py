"""Background responses (HTTP `background: true`): they run on after the request.

`POST /v1/responses` with `background: true` answers at once with the response
`queued` (or, with `stream: true`, streams its events; the client may go away and
the response still runs). The turn runs in a task of its own. Its events (SSE
frames, one per `sequence_number`) are kept, so `GET /v1/responses/{id}?stream=true
&starting_after=N` streams them again from event N + 1 and then live until the
end; `GET /v1/responses/{id}` shows the response as it is now (`queued`,
`in_progress`, or how it ended); `POST /v1/responses/{id}/cancel` stops it (status
`cancelled`; the stream ends, as the API has no terminal event for a cancel);
`DELETE` stops a running one and forgets its events.

A completed (or incomplete) background response is stored like any other and can
be continued by id; a failed or cancelled one is not stored, but stays retrievable
here: with its events for `RETAIN_SECONDS`, then its Response object and input
alone (at most `MAX_ENDED` of them, `MAX_ENDED_BYTES` in all, for the process's life,
and across a restart with `--snapshot`: `snapshot`, `restore`; with a shared store,
its record there answers first, for the store's TTL, and the copy kept here only
when that record was never written and the response not deleted). While it runs,
and as long as it is kept, `GET .../input_items` lists its input (from here, or on
another process from the input its process published beside its state). Finished
runs are kept for `RETAIN_SECONDS` (at most `MAX_FINISHED`, and `MAX_RETAINED_BYTES`
of events) for their events and final state; at most `MAX_RUNNING` run at once
(more get `server_is_overloaded`). A run is local to its process. With a shared
store (Redis) the other processes see it too: the process that runs it publishes the
Response object as it is now, and its events, on a board (`shared_background`), so a
`GET` on another process answers with it while it runs and, for a failed or
cancelled one, after it ended, and streams its events again (for `RETAIN_SECONDS`
after it ended, too); a cancel or delete there is announced to the process that runs
it (a completed one is stored and shared as any stored response).
Shutdown cancels the runs still going.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

import msgpack  # type: ignore[import-untyped]

from warmsocket import errors
from warmsocket._core import InvalidItems, Items
from warmsocket.engine import SharedBackgroundBoard, Turn

log = logging.getLogger("warmsocket.background")

MAX_RUNNING = 256
"""Background responses running at once in one process."""
MAX_FINISHED = 1024
"""Finished background responses whose events and state are kept."""
RETAIN_SECONDS = 600.0
"""How long a finished background response's events and state are kept."""
CANCEL_WAIT_SECONDS = 5.0
"""How long a cancel asked of another process waits to see the response cancelled."""
HEARTBEAT_SECONDS = 10.0
"""How often a running response's state is published again (with a board)."""
SHARE_WAIT_SECONDS = 1.0
"""How long a background create waits, with a board, for its response's first state
and events to be on it before it is answered, at most: a client that polls or
streams it next through another process finds it there (Redis not answering: the
create is answered after this, and the run goes on here)."""
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
MAX_ENDED = 10_000
MAX_ENDED_BYTES = 64 * 1024 * 1024
"""Failed and cancelled responses (never stored) whose Response object and input are
kept after their run is forgotten (without a board), at most, oldest forgotten first."""
MAX_RETAINED_BYTES = 256 * 1024 * 1024
"""What finished background responses kept may hold, in all (older ones are forgotten
first): their events, and their turn's request and context (which may keep parts of
a chain the session cache has let go; they are not part of its budget)."""

SNAPSHOT_VERSION = 1
"""Of `BackgroundResponses.snapshot`'s format."""

_EVENT_END = b"\n\n"


class _Ended(NamedTuple):
    """A failed or cancelled response kept after its run was forgotten."""

    owner: str
    response: bytes
    """Its Response object (GET, cancel)."""
    kept_at: float
    input: Items
    """What its request sent (`GET .../input_items`)."""

    @property
    def nbytes(self) -> int:
        return len(self.response) + self.input.nbytes


class BackgroundRun:
    """One background response: its turn, its events so far, and its task."""

    __slots__ = (
        "changed",
        "event_bytes",
        "events",
        "finished_at",
        "forgotten",
        "held_bytes",
        "on_events",
        "on_status",
        "owner",
        "published_status",
        "task",
        "turn",
    )

    def __init__(self, turn: Turn, owner: str) -> None:
        self.turn = turn
        self.owner = owner
        self.events: list[bytes] = []
        """SSE events, one per sequence number (index = `sequence_number`)."""
        self.event_bytes = 0
        self.held_bytes = 0
        """What it counts against `MAX_RETAINED_BYTES` once finished (`finish`)."""
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.finished_at: float | None = None
        self.forgotten = False
        """Deleted: its state is not published again."""
        self.on_status: Callable[[BackgroundRun], None] | None = None
        """Called when an emitted event changed the response's status."""
        self.on_events: Callable[[BackgroundRun, int], None] | None = None
        """Called with the sequence number of the first new event after each emit."""
        self.published_status: str | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def emit(self, frames: bytes) -> None:
        """Keep a turn's SSE frames (one or more whole events) and wake the readers."""
        if not frames:
            return
        events = self.events
        first = len(events)
        start = 0
        while start < len(frames):
            end = frames.find(_EVENT_END, start)
            end = len(frames) if end < 0 else end + len(_EVENT_END)
            events.append(frames[start:end])
            start = end
        self.event_bytes += len(frames)
        self._wake()
        if self.on_events is not None:
            self.on_events(self, first)
        if self.on_status is not None and self.turn.stream.status != self.published_status:
            self.on_status(self)

    def finish(self) -> None:
        self.finished_at = time.monotonic()
        request = self.turn.request
        self.held_bytes = (
            self.event_bytes
            + request.input.nbytes
            + len(request.settings_json)
            + self.turn.view.nbytes
        )
        self._wake()

    def _wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def response_json(self) -> bytes:
        """The Response object now."""
        return self.turn.stream.response_json()

    async def follow(
        self,
        after: int,
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        closing: Callable[[], bool],
    ) -> None:
        """Write the events after sequence number `after`, then the new ones as they
        come, until the run ends or the reader goes away."""
        position = max(after + 1, 0)
        while not closing():
            if position < len(self.events):
                write(b"".join(self.events[position:]))
                position = len(self.events)
                await drain()
                continue
            if self.finished:
                return
            await self.changed.wait()


class BackgroundResponses:
    """The background responses of one process, by id."""

    def __init__(self, board: SharedBackgroundBoard | None = None) -> None:
        """`board`: where the runs' state is shared with other processes, if anywhere."""
        self.board = board
        self._heartbeat: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        """When the oldest finished run is past its retention (`_expire_later`)."""
        self._closed = False
        self._announced: set[asyncio.Task[None]] = set()
        """Cancels and deletions other processes asked for, under way."""
        self._running: dict[str, BackgroundRun] = {}
        self._finished: OrderedDict[str, BackgroundRun] = OrderedDict()
        """Oldest first: expired from the front."""
        self._finished_bytes = 0
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        """Failed and cancelled responses whose run was forgotten, oldest first."""
        self._ended_bytes = 0

    def get(self, response_id: str, owner: str) -> BackgroundRun | None:
        self._expire()
        run = self._running.get(response_id) or self._finished.get(response_id)
        return run if run is not None and run.owner == owner and not run.forgotten else None

    def start(
        self, turn: Turn, owner: str, body: Callable[[BackgroundRun], Awaitable[None]]
    ) -> BackgroundRun:
        """Register `turn` and run `body(run)` in a task of its own; a cancellation
        ends the turn `cancelled`. Raises APIError (the turn discarded) when too many
        run already."""
        self._expire()
        if len(self._running) >= MAX_RUNNING:
            turn.discard()
            raise errors.server_overloaded(
                f"This server runs at most {MAX_RUNNING} background responses at once; "
                "retry later, or stream the response instead."
            )
        run = BackgroundRun(turn, owner)
        self._running[turn.response_id] = run

        async def main() -> None:
            try:
                await body(run)
            except asyncio.CancelledError:
                if not turn.finished:
                    run.emit(turn.cancel())
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # asked for (`cancel`): the task ends normally
            except Exception:
                log.exception("background response failed")
                if not turn.finished:
                    run.emit(turn.fail(errors.model_failed()))
            finally:
                if not turn.finished:
                    turn.release()
                del self._running[turn.response_id]
                run.finish()
                if not run.forgotten:  # (deleted as it ran: not to be found again)
                    self._finished[turn.response_id] = run
                    self._finished_bytes += run.held_bytes
                    self._expire_later()
                if turn.stream.status != run.published_status:
                    self._publish(run)
                if self.board is not None and not run.forgotten:
                    self.board.end_events(
                        run.owner,
                        turn.response_id,
                        len(run.events),
                        turn.stream.status,
                        int(RETAIN_SECONDS),
                    )

        loop = asyncio.get_running_loop()
        run.task = loop.create_task(main())
        if self.board is not None:
            run.on_status = self._publish  # queued now, in_progress, how it ended
            run.on_events = self._share_events
            self._publish(run)
            if self._heartbeat is None:
                self._heartbeat = loop.create_task(self._beat(self.board))
        return run

    async def shared(self) -> None:
        """Wait until what the runs published so far is on the board (with one; at
        most `SHARE_WAIT_SECONDS`)."""
        if self.board is not None:
            await self.board.written(SHARE_WAIT_SECONDS)

    def _publish(self, run: BackgroundRun) -> None:
        """Share the run's state now (with a board, unless it was deleted)."""
        if self.board is None or run.forgotten:
            return
        stream = run.turn.stream
        first = run.published_status is None
        run.published_status = status = stream.status
        self.board.publish(
            run.owner,
            run.turn.response_id,
            stream.response_json(),
            status=status,
            input_json=run.turn.request.input.json() if first else None,
        )

    def _share_events(self, run: BackgroundRun, first: int) -> None:
        """Share the run's events from sequence number `first` on (with a board,
        unless it was deleted)."""
        if self.board is None or run.forgotten:
            return
        self.board.append_events(run.owner, run.turn.response_id, first, run.events[first:])

    async def _beat(self, board: SharedBackgroundBoard) -> None:
        """Publish the running responses' state again, so their records stay (and
        show `in_progress` and the output so far) while their process lives; cancel
        those another process asked to cancel (its announcement may have been lost)."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            # (A call of its own: no run is held while the loop sleeps.)
            await self._beat_once(board)

    async def _beat_once(self, board: SharedBackgroundBoard) -> None:
        for run in list(self._running.values()):
            self._publish(run)
        runs = [(run.owner, response_id) for response_id, run in self._running.items()]
        try:
            asked = await board.cancels_asked(runs)
        except Exception as exc:  # Redis down: the announcements still reach here
            log.warning(
                "cannot look for background cancels in Redis",
                extra={"error_type": type(exc).__name__},
            )
            return
        for owner, response_id in asked:
            self.cancel_announced(owner, response_id)

    def forget(self, run: BackgroundRun) -> None:
        """Drop a finished run's events and state, here and on the board (the
        response was deleted)."""
        run.forgotten = True
        if self.board is not None:
            self.board.forget(run.owner, run.turn.response_id)
        if self._finished.pop(run.turn.response_id, None) is not None:
            self._finished_bytes -= run.held_bytes

    # -- runs of other processes (with a board) -------------------------------------------

    async def state_elsewhere(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The Response object of a background response that neither runs here nor is
        stored: one that failed or was cancelled here (kept after its run was
        forgotten), else as the process that runs it (or ran it) last published it on
        the board. None when there is none. Raises SharedStoreUnavailable."""
        self._expire()
        kept = self._ended.get(response_id)
        if kept is not None and kept.owner != owner:
            kept = None
        board = self.board
        if board is None:
            return None if kept is None else _loads(kept.response)
        # With a board its record answers, in every process: a deletion made through
        # any of them (its announcement missed here, even) holds. The copy kept here
        # answers only when Redis has neither the record nor a deletion, within the
        # record's TTL: its final write was lost (a full queue, a give-up, a shutdown).
        state = await board.get(owner, response_id)
        if state is not None or kept is None:
            return state
        if time.monotonic() - kept.kept_at >= board.ttl or await board.deleted(owner, response_id):
            self.forget_ended(response_id, owner)
            return None
        return _loads(kept.response)

    async def cancel_elsewhere(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """Cancel a background response another process runs: ask it, then wait (at
        most `CANCEL_WAIT_SECONDS`) until its record says it ended. The Response object
        as it is then; None without a board or a record. Raises
        SharedStoreUnavailable."""
        state = await self.state_elsewhere(response_id, owner)
        if state is None or state.get("status") in TERMINAL or self.board is None:
            return state
        await self.board.request_cancel(owner, response_id)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = await self.board.get(owner, response_id)
            if now is None:  # deleted meanwhile
                return state
            state = now
            if state.get("status") in TERMINAL:
                break
        return state

    def cancel_announced(self, owner: str, response_id: str) -> None:
        """Another process asked for a cancel: cancel the run if it is here."""
        run = self._running.get(response_id)
        if run is not None and run.owner == owner:
            self._spawn(self.cancel(run))

    def delete_announced(self, owner: str, response_id: str) -> None:
        """Another process deleted the response: stop and forget the run if it is here,
        or the failed or cancelled response kept after it."""
        self.forget_ended(response_id, owner)
        run = self.get(response_id, owner)
        if run is None:
            return

        async def drop(run: BackgroundRun) -> None:
            await self.cancel(run)
            self.forget(run)

        run.forgotten = True  # its end is not published: the record is gone
        self._spawn(drop(run))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in a task kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._announced.add(task)
        task.add_done_callback(self._announced.discard)

    @property
    def running(self) -> int:
        """Background responses running in this process."""
        return len(self._running)

    def stats(self) -> dict[str, int]:
        self._expire()
        return {
            "running": len(self._running),
            "finished": len(self._finished),
            "retained_bytes": self._finished_bytes,
        }

    async def cancel(self, run: BackgroundRun) -> None:
        """Stop a running response (its status becomes `cancelled`); nothing when it
        has ended already."""
        task = run.task
        if task is None or task.done():
            return
        task.cancel()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the caller's own (its client left): not the run's, to swallow

    async def aclose(self) -> None:
        """Cancel the runs still going (server shutdown), and publish how they ended."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        running = list(self._running.values())
        if running:
            log.info("cancelling background responses", extra={"responses": len(running)})
        for run in running:
            await self.cancel(run)
        self._closed = True
        if self._expiry is not None:  # (after the runs: each one ending arms it)
            self._expiry.cancel()
            self._expiry = None

    def _expire_later(self) -> None:
        """Expire the oldest finished run when its retention ends, then the next: the
        runs go without anything asking for one (a request, a `/metrics` scrape)."""
        if self._expiry is not None or not self._finished or self._closed:
            return
        oldest = next(iter(self._finished.values()))
        assert oldest.finished_at is not None
        wait = max(0.0, oldest.finished_at + RETAIN_SECONDS - time.monotonic()) + 0.01

        def expire() -> None:
            self._expiry = None
            self._expire()
            self._expire_later()

        self._expiry = asyncio.get_running_loop().call_later(wait, expire)

    def _expire(self) -> None:
        """Forget finished runs past their retention, oldest first."""
        now = time.monotonic()
        finished = self._finished
        while finished:
            run = next(iter(finished.values()))
            assert run.finished_at is not None
            if (
                len(finished) <= MAX_FINISHED
                and self._finished_bytes <= MAX_RETAINED_BYTES
                and now - run.finished_at <= RETAIN_SECONDS
            ):
                break
            finished.popitem(last=False)
            self._finished_bytes -= run.held_bytes
            if run.turn.stream.status in ("failed", "cancelled") and not run.forgotten:
                self._keep_ended(run)  # (with a board: see `state_elsewhere`)

    def _keep_ended(self, run: BackgroundRun) -> None:
        """Keep a failed or cancelled response's Response object and input (it is not
        stored)."""
        kept = _Ended(run.owner, run.response_json(), time.monotonic(), run.turn.request.input)
        self._keep(run.turn.response_id, kept)

    def _keep(self, response_id: str, kept: _Ended) -> None:
        before = self._ended.pop(response_id, None)
        if before is not None:
            self._ended_bytes -= before.nbytes
        self._ended[response_id] = kept
        self._ended_bytes += kept.nbytes
        while len(self._ended) > MAX_ENDED or self._ended_bytes > MAX_ENDED_BYTES:
            _id, dropped = self._ended.popitem(last=False)
            self._ended_bytes -= dropped.nbytes

    def ended_input(self, response_id: str, owner: str) -> Items | None:
        """The input of a failed or cancelled response kept after its run (whether it
        still exists is `state_elsewhere`'s to say); None when none is kept here."""
        kept = self._ended.get(response_id)
        return kept.input if kept is not None and kept.owner == owner else None

    def forget_ended(self, response_id: str, owner: str) -> bool:
        """Drop a failed or cancelled response kept after its run (it was deleted);
        whether there was one."""
        kept = self._ended.get(response_id)
        if kept is None or kept.owner != owner:
            return False
        del self._ended[response_id]
        self._ended_bytes -= kept.nbytes
        return True

    def unstored(self) -> list[tuple[str, _Ended]]:
        """The failed and cancelled responses kept here, those of finished runs too,
        oldest first (`snapshot`)."""
        kept = list(self._ended.items())
        kept += [
            (rid, _Ended(run.owner, run.response_json(), 0.0, run.turn.request.input))
            for rid, run in self._finished.items()
            if run.turn.stream.status in ("failed", "cancelled") and not run.forgotten
        ]
        return kept

    def snapshot(self) -> bytes:
        """`unstored` as msgpack (`restore` reads it back): for `--snapshot` without
        Redis, taken after `aclose` (which cancelled the runs still going)."""
        responses = [
            {"id": rid, "owner": e.owner, "response": e.response, "input": e.input.json()}
            for rid, e in self.unstored()
        ]
        packed = msgpack.packb({"v": SNAPSHOT_VERSION, "responses": responses}, use_bin_type=True)
        return bytes(packed)

    def restore(self, data: bytes) -> int:
        """Keep the failed and cancelled responses of a `snapshot` (within `MAX_ENDED`
        and `MAX_ENDED_BYTES`, the oldest dropped first); how many it held. Raises
        ValueError for data that is not one (nothing kept then)."""
        try:
            parsed = msgpack.unpackb(data, raw=False)
            if not isinstance(parsed, dict) or parsed.get("v") != SNAPSHOT_VERSION:
                raise ValueError("not a background responses snapshot of this version")
            restored = []
            now = time.monotonic()
            for entry in parsed["responses"]:
                response = bytes(entry["response"])
                if not isinstance(json.loads(response), dict):
                    raise ValueError("a response that is not a JSON object")
                joined = bytes(entry["input"])
                items = Items.parse(joined, max_item_bytes=max(len(joined), 1))
                restored.append(
                    (str(entry["id"]), _Ended(str(entry["owner"]), response, now, items))
                )
        except (ValueError, KeyError, TypeError, InvalidItems, msgpack.UnpackException) as exc:
            raise ValueError(
                f"cannot read the background responses snapshot ({type(exc).__name__})"
            ) from None
        for response_id, kept in restored:
            self._keep(response_id, kept)
        return len(restored)


def _loads(response: bytes) -> dict[str, Any]:
    """A kept Response object, decoded."""
    state: dict[str, Any] = json.loads(response)
    return state
