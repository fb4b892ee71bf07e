"""Reading trace files: JSON lines in large chunks, without a Python object per line beyond its bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB: few system calls, and the split list stays small enough to stay in cache


def lines(path: str | Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """Every line of the file, newline stripped (blank lines included, so callers can count line numbers)."""
    with open(path, "rb") as stream:
        rest = b""
        while block := stream.read(chunk):
            parts = (rest + block).split(b"\n") if rest else block.split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest
