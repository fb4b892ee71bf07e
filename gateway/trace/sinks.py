"""Trace sinks: events are handed to a writer thread, so no request ever waits on log I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import orjson

from .event import TraceEvent


class TraceSink(Protocol):
    def emit(self, event: TraceEvent) -> None: ...
    def close(self) -> None: ...


HANDOFF_DELAY = 0.02  # seconds an event may wait before it goes to the writer thread


class LineWriter:
    """JSON lines to stdout or a file. `emit` serialises (a few microseconds, on the caller) and buffers the
    bytes; every 20 ms at most the buffer goes to a writer thread, which writes what it got in one call.
    The thread does little but I/O, during which it releases the GIL, so it does not stall the event loop;
    no request waits on a disk.
    A file target rotates at `max_bytes` (keeping `backups` old files), like logging's RotatingFileHandler.
    `on_written` (for tests and tail-like consumers) is called on the writer thread with each written batch.
    """

    def __init__(self, target: str, max_bytes: int = 100 * 2**20, backups: int = 5,
                 on_written: Callable[[bytes], None] | None = None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.backups = backups
        self.on_written = on_written
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._pending: list[bytes] = []  # serialised on the loop, not yet handed to the writer thread
        self._unwritten = bytearray()  # handed over but refused by the disk: retried every second
        self.max_unwritten = 64 * 2**20
        self.dropped = 0  # events given up on since the last successful write
        self.failing: str | None = None  # why writing fails, while it does (reported by /readyz)
        self._handoff_scheduled = False
        self._stream: IO[bytes] = self._open()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def _open(self) -> IO[bytes]:
        if self.target == "-":
            return sys.stdout.buffer
        return open(self.target, "ab")

    def emit(self, event: TraceEvent) -> None:
        self._pending.append(orjson.dumps(event.to_dict(), default=str, option=orjson.OPT_APPEND_NEWLINE))
        if self._handoff_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (offline tools): hand over at once
            self._handoff()
            return
        # Waking the writer thread costs a syscall and a GIL hand-off: do it at most every HANDOFF_DELAY, for
        # everything emitted meanwhile (under load one loop iteration often emits just one event).
        self._handoff_scheduled = True
        loop.call_later(HANDOFF_DELAY, self._handoff)

    def _handoff(self) -> None:
        self._handoff_scheduled = False
        if self._pending:
            batch, self._pending = b"".join(self._pending), []
            self._queue.put(batch)

    def close(self) -> None:
        """Write everything emitted so far, then stop the thread and close the file."""
        self._handoff()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:  # while writes fail, wake every second to retry even if nothing new arrives
                batch = [self._queue.get(timeout=1.0 if self._unwritten else None)]
            except queue.Empty:
                batch = [b""]
            while True:  # drain what is queued, then write it in one go
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                stopping = True
            data = b"".join(line for line in batch if line is not None)
            if data or self._unwritten:
                self._write(data)
        if self.target != "-":
            self._stream.close()
        else:
            self._stream.flush()

    def _write(self, data: bytes) -> None:
        """Write what is pending; if the disk (or pipe) refuses, keep it (bounded) and retry, never die."""
        pending = bytes(self._unwritten) + data
        if not self._try_write(pending):
            return
        self._unwritten = bytearray()
        if self.on_written is not None and data:
            self.on_written(data)
        if self.failing is not None:  # writing works again: say what was lost meanwhile, if anything
            self.failing = None
            if self.dropped and self._try_write(self._dropped_record()):
                self.dropped = 0

    def _try_write(self, pending: bytes) -> bool:
        try:
            if self._stream.closed:
                self._stream = self._open()
            self._stream.write(pending)
            self._stream.flush()
            if self.target != "-" and self._stream.tell() >= self.max_bytes:
                self._rotate()
        except (OSError, ValueError) as exc:
            self._keep(pending, exc)
            return False
        return True

    def _keep(self, pending: bytes, exc: Exception) -> None:
        if self.failing is None:
            print(f"agent-gateway: cannot write the trace to {self.target} ({exc}); keeping up to "
                  f"{self.max_unwritten // 2**20} MiB and retrying every second", file=sys.stderr, flush=True)
        self.failing = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError, ValueError):
            self._stream.close()
        if len(pending) > self.max_unwritten:  # drop the oldest whole lines, and count them
            cut = pending.index(b"\n", len(pending) - self.max_unwritten) + 1
            self.dropped += pending.count(b"\n", 0, cut)
            pending = pending[cut:]
        self._unwritten = bytearray(pending)

    def _dropped_record(self) -> bytes:
        return orjson.dumps({"ts": time.time(), "kind": "trace_dropped", "count": self.dropped,
                             "reason": "the trace could not be written and the backlog was full"},
                            option=orjson.OPT_APPEND_NEWLINE)

    def _rotate(self) -> None:
        self._stream.close()
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.target}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.target}.{i + 1}")
        os.replace(self.target, f"{self.target}.1")
        self._stream = self._open()


class MemorySink:
    """Keeps events in a list, and lets a coroutine await the one it expects (tests, the demo)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[asyncio.Future[None]] = []

    def emit(self, event: TraceEvent) -> None:
        self.events.append(event.to_dict())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], limit: float = 10.0) -> dict[str, Any]:
        """The first event matching `predicate`, waiting for it to be emitted if need be."""
        async with asyncio.timeout(limit):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def close(self) -> None:
        pass


class FanOut:
    """Hands each event to several sinks (e.g. a file for the record and a live view)."""

    def __init__(self, *sinks: TraceSink) -> None:
        self.sinks = sinks

    @property
    def failing(self) -> str | None:
        """Why the trace record cannot be written right now, if it cannot."""
        return next((f for sink in self.sinks if (f := getattr(sink, "failing", None))), None)

    def emit(self, event: TraceEvent) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
