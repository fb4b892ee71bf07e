"""Hot reload: load and compile the whole rules directory, then swap it in between requests; keep the last good
version when a change is broken, a history of what was served, and earlier versions to roll back to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .policy.compile import Policy
from .policy.spec import RuleSetInvalid
from .tasks import stop
from .trace.event import TraceEvent, new_span_id, new_trace_id
from .trace.sinks import TraceSink

KEEP_HISTORY = 50
KEEP_COMPILED = 10  # versions kept compiled for an instant rollback


@dataclass(frozen=True, slots=True)
class Served:
    """One version the gateway served: since when, who or what loaded it, and why."""

    version: str
    git_commit: str | None
    loaded_at: float
    by: str
    source: str  # startup | watch | sighup | admin | replica | rollback


@dataclass(frozen=True, slots=True)
class Outcome:
    changed: bool
    version: str
    errors: tuple[str, ...] = ()


def git_commit(directory: str) -> str | None:
    """The commit of the rules directory when it is in a git work tree (with `+dirty` for local changes)."""
    try:
        head = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", directory, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def scan(directory: str) -> tuple[tuple[str, int, int], ...]:
    """What the watcher compares: every rule file with its modification time and size (symlinks followed, as a
    Kubernetes ConfigMap swaps them)."""
    root = Path(directory)
    files = [root / "upstreams.yaml", *sorted((root / "agents").glob("*.y*ml"))]
    found = []
    for file in files:
        with contextlib.suppress(OSError):
            stat = os.stat(file)
            found.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


class Reloader:
    def __init__(self, directory: str, load: Callable[[], Policy], sink: TraceSink,
                 swap: Callable[[Policy], None]) -> None:
        self.directory = directory
        self._load = load
        self._sink = sink
        self._swap = swap
        self.history: list[Served] = []
        self.compiled: OrderedDict[str, Policy] = OrderedDict()
        self.last_error: dict[str, Any] | None = None
        self.on_swap: list[Callable[[Served], None]] = []  # e.g. tell the other replicas
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._seen: tuple[tuple[str, int, int], ...] = ()  # the files as they were when last loaded

    @property
    def current(self) -> Served:
        return self.history[-1]

    def started(self, policy: Policy) -> None:
        self._seen = scan(self.directory)  # the watcher's baseline: a change from here on is a change
        self._record(policy, "startup", "gateway", git_commit(self.directory))

    async def reload(self, source: str, by: str) -> Outcome:
        """Load the directory again; swap it in if it is valid and new. One reload at a time."""
        async with self._lock:
            # Taken before loading: a change made while loading is seen by the watcher next time round.
            self._seen = await asyncio.to_thread(scan, self.directory)
            try:
                policy = await asyncio.to_thread(self._load)  # YAML and CEL work stays off the event loop
            except RuleSetInvalid as invalid:
                errors = tuple(str(e) for e in invalid.errors)
                self.last_error = {"at": time.time(), "source": source, "by": by, "errors": list(errors)}
                self._event("rules_rejected", f"rules change rejected ({len(errors)} errors); still serving "
                                              f"{self.current.version}", {"errors": list(errors), "by": by,
                                                                           "source": source})
                print(f"agent-gateway: rules change rejected, still serving {self.current.version}:",
                      *errors, sep="\n  ", file=sys.stderr, flush=True)
                return Outcome(False, self.current.version, errors)
            self.last_error = None
            if policy.version == self.current.version:
                return Outcome(False, policy.version)
            commit = await asyncio.to_thread(git_commit, self.directory)
            self._activate(policy, source, by, commit)
            return Outcome(True, policy.version)

    def rollback(self, version: str, by: str, source: str = "rollback") -> Outcome:
        """Serve an earlier version again, from the compiled copies kept; KeyError if it is not kept."""
        policy = self.compiled[version]
        if version != self.current.version:
            earlier = next((s for s in reversed(self.history) if s.version == version), None)
            self._activate(policy, source, by, earlier.git_commit if earlier else None)
            return Outcome(True, version)
        return Outcome(False, version)

    def _activate(self, policy: Policy, source: str, by: str, commit: str | None) -> None:
        self._swap(policy)  # one assignment: requests already running keep the policy they started with
        served = self._record(policy, source, by, commit)
        self._event("rules_loaded", f"now serving {policy.version} ({source} by {by})",
                    {"by": by, "source": source, "git_commit": commit}, version=policy.version)
        for listener in self.on_swap:
            listener(served)

    def _record(self, policy: Policy, source: str, by: str, commit: str | None) -> Served:
        served = Served(policy.version, commit, time.time(), by, source)
        self.history = [*self.history[-(KEEP_HISTORY - 1):], served]
        self.compiled[policy.version] = policy
        self.compiled.move_to_end(policy.version)
        while len(self.compiled) > KEEP_COMPILED:
            self.compiled.popitem(last=False)
        return served

    def _event(self, kind: str, reason: str, detail: dict[str, Any], version: str | None = None) -> None:
        self._sink.emit(TraceEvent(trace_id=new_trace_id(), span_id=new_span_id(), kind=kind, reason=reason,
                                   detail=detail, policy_version=version or self.current.version))

    def watch(self, interval: float) -> None:
        """Reload whenever a rule file changes (checked every `interval` seconds, off the event loop)."""
        if interval > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(interval))

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # the polling period of the watcher
            if await asyncio.to_thread(scan, self.directory) != self._seen:
                await self.reload("watch", "file watcher")

    async def close(self) -> None:
        await stop(self._watcher)

    def describe(self) -> dict[str, Any]:
        return {"version": self.current.version, "git_commit": self.current.git_commit,
                "loaded_at": self.current.loaded_at, "history": [asdict(s) for s in reversed(self.history)],
                "rollback_to": list(reversed(self.compiled)), "last_error": self.last_error}
