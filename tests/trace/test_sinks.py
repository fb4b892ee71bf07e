"""Trace sinks: the JSON-lines writer thread (order, no blocking, rotation) and the in-memory sink's waiting."""

from __future__ import annotations

import asyncio
import queue
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.trace.event import TraceEvent
from gateway.trace.sinks import LineWriter, MemorySink

WAIT = 10.0  # seconds; a bound on thread hand-offs, never a sleep


def event(n: int, **fields: Any) -> TraceEvent:
    return TraceEvent(trace_id=f"{n:032x}", span_id=f"{n:016x}", ts=1700000000.0, **fields)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_line_writer_writes_one_json_line_per_event_in_order(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    writer = LineWriter(str(target))
    for n in range(500):
        writer.emit(event(n, agent="invoice-bot", decision="allow", tokens={"input": n, "output": 1}))
    writer.close()
    raw = target.read_bytes()
    assert raw.endswith(b"\n")
    records = read_lines(target)
    assert len(records) == 500
    assert [r["trace_id"] for r in records] == [f"{n:032x}" for n in range(500)]
    assert records[7] == {"trace_id": f"{7:032x}", "span_id": f"{7:016x}", "ts": 1700000000.0,
                          "agent": "invoice-bot", "decision": "allow", "tokens": {"input": 7, "output": 1}}


def test_line_writer_omits_unset_fields(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    writer = LineWriter(str(target))
    writer.emit(event(1))
    writer.close()
    assert read_lines(target) == [{"trace_id": f"{1:032x}", "span_id": f"{1:016x}", "ts": 1700000000.0}]


def test_line_writer_appends_to_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    target.write_bytes(b'{"old": true}\n')
    writer = LineWriter(str(target))
    writer.emit(event(1))
    writer.close()
    assert [r.get("old", r.get("trace_id")) for r in read_lines(target)] == [True, f"{1:032x}"]


def test_line_writer_close_with_nothing_emitted_leaves_empty_file(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    LineWriter(str(target)).close()
    assert target.read_bytes() == b""


def test_line_writer_emit_never_waits_for_the_writer(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    gate = threading.Event()
    entered = threading.Event()

    def stall(data: bytes) -> None:
        entered.set()
        assert gate.wait(WAIT)

    writer = LineWriter(str(target), on_written=stall)
    writer.emit(event(0))
    assert entered.wait(WAIT)  # the writer thread wrote event 0 and is now stuck
    for n in range(1, 2001):
        writer.emit(event(n))  # each returns although nothing more can be written
    assert len(read_lines(target)) == 1
    gate.set()
    writer.close()
    assert len(read_lines(target)) == 2001


def test_line_writer_reports_each_written_batch(tmp_path: Path) -> None:
    seen: list[bytes] = []
    writer = LineWriter(str(tmp_path / "trace.jsonl"), on_written=seen.append)
    writer.emit(event(1, agent="a"))
    writer.emit(event(2, agent="b"))
    writer.close()
    assert [orjson.loads(line)["agent"] for line in b"".join(seen).splitlines()] == ["a", "b"]


def test_line_writer_rotates_at_max_bytes_keeping_backups(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    line = len(orjson.dumps(event(0).to_dict())) + 1
    written: queue.SimpleQueue[str] = queue.SimpleQueue()
    writer = LineWriter(str(target), max_bytes=3 * line, backups=2,
                        on_written=lambda data: written.put(orjson.loads(data)["trace_id"]))
    for n in range(10):
        # One event at a time, so each is its own write and the rotation points are exact.
        writer.emit(event(n))
        assert written.get(timeout=WAIT) == f"{n:032x}"
    writer.close()

    def ids(path: Path) -> list[int]:
        return [int(r["trace_id"], 16) for r in read_lines(path)]

    assert ids(target) == [9]
    assert ids(tmp_path / "trace.jsonl.1") == [6, 7, 8]
    assert ids(tmp_path / "trace.jsonl.2") == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl", "trace.jsonl.1", "trace.jsonl.2"]


def test_line_writer_rotates_once_a_batch_crosses_max_bytes(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    writer = LineWriter(str(target), max_bytes=1, backups=1)
    for n in range(50):
        writer.emit(event(n))
    writer.close()
    backup = tmp_path / "trace.jsonl.1"
    assert target.read_bytes() == b""  # every write passed 1 byte and was rotated away
    assert len(read_lines(backup)) >= 1
    assert read_lines(backup)[-1]["trace_id"] == f"{49:032x}"
    assert not (tmp_path / "trace.jsonl.2").exists()


def test_line_writer_to_stdout(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    writer = LineWriter("-")
    writer.emit(event(3, agent="x"))
    writer.close()
    out = capfdbinary.readouterr().out
    assert [orjson.loads(line)["agent"] for line in out.splitlines() if line.startswith(b"{")] == ["x"]


# -- MemorySink --------------------------------------------------------------------------------------------------


async def test_memory_sink_wait_for_returns_an_event_emitted_later() -> None:
    sink = MemorySink()
    sink.emit(event(1, agent="a"))

    async def emit_later() -> None:
        await asyncio.sleep(0)
        sink.emit(event(2, agent="b"))
        await asyncio.sleep(0)
        sink.emit(event(3, agent="c"))

    task = asyncio.create_task(emit_later())
    found = await sink.wait_for(lambda e: e.get("agent") == "c", limit=WAIT)
    await task
    assert found["trace_id"] == f"{3:032x}"
    assert [e["agent"] for e in sink.events] == ["a", "b", "c"]


async def test_memory_sink_wait_for_returns_an_already_emitted_event() -> None:
    sink = MemorySink()
    sink.emit(event(1, agent="a"))
    sink.emit(event(2, agent="a"))
    found = await sink.wait_for(lambda e: e["agent"] == "a", limit=WAIT)
    assert found["trace_id"] == f"{1:032x}"


async def test_memory_sink_wait_for_times_out() -> None:
    sink = MemorySink()
    sink.emit(event(1, agent="a"))
    with pytest.raises(TimeoutError):
        await sink.wait_for(lambda e: e["agent"] == "never", limit=0.05)


async def test_memory_sink_wait_for_serves_several_waiters() -> None:
    sink = MemorySink()
    first = asyncio.create_task(sink.wait_for(lambda e: e["agent"] == "x", limit=WAIT))
    second = asyncio.create_task(sink.wait_for(lambda e: e["agent"] == "y", limit=WAIT))
    await asyncio.sleep(0)
    sink.emit(event(1, agent="y"))
    sink.emit(event(2, agent="x"))
    assert (await first)["trace_id"] == f"{2:032x}"
    assert (await second)["trace_id"] == f"{1:032x}"


async def test_line_writer_hands_events_emitted_together_over_in_one_batch(tmp_path: Path) -> None:
    batches: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    writer = LineWriter(str(tmp_path / "trace.jsonl"), on_written=batches.put)
    for n in range(3):  # all before the scheduled hand-off
        writer.emit(event(n))
    batch = await asyncio.to_thread(batches.get, timeout=WAIT)  # the loop stays free to run the hand-off
    writer.close()
    assert [int(orjson.loads(line)["trace_id"], 16) for line in batch.splitlines()] == [0, 1, 2]
    assert batches.empty()


async def test_line_writer_close_flushes_a_batch_not_yet_handed_over(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    writer = LineWriter(str(target))
    writer.emit(event(7))
    writer.close()  # before the loop ran the hand-off
    assert [int(r["trace_id"], 16) for r in read_lines(target)] == [7]


def test_line_writer_survives_a_full_disk_and_says_what_it_dropped(tmp_path: Path) -> None:
    target = tmp_path / "trace.jsonl"
    writer = LineWriter(str(target))  # its thread idles in get(): the test drives the writes itself
    line = orjson.dumps(event(0).to_dict(), option=orjson.OPT_APPEND_NEWLINE)
    writer.max_unwritten = 2 * len(line) + 10  # room for two events
    real_open = writer._open
    full = {"on": True}

    class Full:
        closed = False

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None:
            self.closed = True

    writer._open = lambda: Full() if full["on"] else real_open()  # type: ignore[method-assign]
    writer._stream.close()  # the next write reopens: onto the "full disk"
    for n in range(5):
        writer._write(orjson.dumps(event(n).to_dict(), option=orjson.OPT_APPEND_NEWLINE))
    assert writer.failing is not None and "No space left" in writer.failing
    assert writer.dropped == 3  # two fit in the backlog, the three oldest were given up
    full["on"] = False  # space again
    writer._write(orjson.dumps(event(5).to_dict(), option=orjson.OPT_APPEND_NEWLINE))
    writer.close()
    records = [orjson.loads(raw) for raw in target.read_bytes().splitlines()]
    assert [int(r["trace_id"], 16) for r in records if "trace_id" in r] == [3, 4, 5]
    assert [(r["kind"], r["count"]) for r in records if r.get("kind") == "trace_dropped"] == [("trace_dropped", 3)]
    assert writer.failing is None
