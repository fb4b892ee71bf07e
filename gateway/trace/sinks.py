"""Trace sinks: events are handed to a writer thread, so no request ever waits on log I/O."""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
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
            batch = [self._queue.get()]
            while True:  # drain what is queued, then write it in one go
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                stopping = True
            data = b"".join(line for line in batch if line is not None)
            if data:
                self._write(data)
                if self.on_written is not None:
                    self.on_written(data)
        if self.target != "-":
            self._stream.close()
        else:
            self._stream.flush()

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()
        if self.target != "-" and self._stream.tell() >= self.max_bytes:
            self._rotate()

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

    def emit(self, event: TraceEvent) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
