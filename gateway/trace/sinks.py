"""Trace sinks: events are handed to a writer thread, so no request ever waits on log I/O."""

from __future__ import annotations

import asyncio
import io
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, Protocol

import orjson

from .event import TraceEvent

_STOP: Any = object()


class TraceSink(Protocol):
    def emit(self, event: TraceEvent) -> None: ...
    def close(self) -> None: ...


class LineWriter:
    """Buffered JSON-lines writer on its own thread. `emit` is a queue put; `close` drains everything.

    Serialising happens on the writer thread too, so the request path pays for neither encoding nor I/O.
    A file target rotates at `max_bytes` (keeping `backups` old files), like logging's RotatingFileHandler.
    """

    def __init__(self, target: str, max_bytes: int = 100 * 2**20, backups: int = 5,
                 listeners: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.backups = backups
        self.listeners = listeners or []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stream: IO[bytes] = self._open()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def _open(self) -> IO[bytes]:
        if self.target == "-":
            return sys.stdout.buffer
        return open(self.target, "ab")

    def emit(self, event: TraceEvent) -> None:
        self._queue.put(event)

    def close(self) -> None:
        self._queue.put(_STOP)
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
            out = io.BytesIO()
            for item in batch:
                if item is _STOP:
                    stopping = True
                    continue
                record = item.to_dict()
                for listener in self.listeners:
                    listener(record)
                out.write(orjson.dumps(record, default=str))
                out.write(b"\n")
            self._write(out.getvalue())
        if self.target != "-":
            self._stream.close()
        else:
            self._stream.flush()

    def _write(self, data: bytes) -> None:
        if not data:
            return
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
