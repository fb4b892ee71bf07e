"""The admin subcommands (`approvals`, `pause`, `resume`, `tail`): call the admin API, print for people or as JSON.

Exit codes: 0 done, 1 the admin API refused (its message is printed), 2 the admin API could not be reached.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import orjson

from .client import AdminApiError, AdminClient, AdminUnreachable

FULL_ID = 32  # approval ids are uuid4 hex; anything shorter is a prefix to resolve
REASON_WIDTH = 60


class CommandFailed(Exception):
    """A command could not do what was asked, for a reason found on this side (e.g. an ambiguous id prefix)."""


Command = Callable[[AdminClient], Awaitable[int]]


def run(prog: str, url: str, token: str, command: Command, interrupt_ok: bool = False) -> int:
    """Run `command` with a client for `url`; errors become a message on stderr and the exit code."""

    async def main() -> int:
        async with AdminClient(url, token) as client:
            return await command(client)

    try:
        return asyncio.run(main())
    except AdminApiError as error:
        print(f"{prog}: {error.status} {error.type}: {error.message}", file=sys.stderr)
        return 1
    except CommandFailed as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except AdminUnreachable as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0 if interrupt_ok else 130
    except BrokenPipeError:  # `| head`: the reader has gone, which is not our failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _print_json(data: Any, out: TextIO) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode(), file=out)


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def action(record: dict[str, Any]) -> str:
    """`verb upstream/resource`, as approvals and traces both name a call."""
    target = record.get("upstream") or "-"
    if record.get("resource"):
        target = f"{target}/{record['resource']}"
    return f"{record.get('verb') or '-'} {target}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def approvals_table(approvals: Sequence[dict[str, Any]], now: float) -> str:
    rows = [("ID", "AGE", "STATUS", "AGENT", "ACTION", "RULE", "REASON")]
    rows += [(a["id"][:8], age(now - float(a["created_at"])), a.get("status") or "-", a.get("agent") or "-",
              action(a), a.get("rule") or "-", _clip(a.get("reason") or "", REASON_WIDTH)) for a in approvals]
    return table(rows)


def list_approvals(status: str | None, agent: str | None, as_json: bool, out: TextIO = sys.stdout) -> Command:
    async def command(client: AdminClient) -> int:
        approvals = await client.approvals(status=status, agent=agent)
        if as_json:
            _print_json({"approvals": approvals}, out)
        elif not approvals:
            what = f"{status} approvals" if status else "approvals"
            print(f"no {what}" + (f" for {agent}" if agent else ""), file=out)
        else:
            print(approvals_table(approvals, time.time()), file=out)
        return 0

    return command


async def resolve_id(client: AdminClient, prefix: str) -> str:
    """A full approval id from the prefix the table shows (like git's short hashes): it must match exactly one."""
    if len(prefix) >= FULL_ID:
        return prefix
    matches = [a["id"] for a in await client.approvals() if str(a["id"]).startswith(prefix)]
    if not matches:
        raise CommandFailed(f"no approval id starts with {prefix!r}")
    if len(matches) > 1:
        raise CommandFailed(f"{len(matches)} approvals start with {prefix!r}; give more of the id")
    return str(matches[0])


def decide(approval_id: str, verdict: str, reason: str, category: str | None, remember: str | None,
           as_json: bool, out: TextIO = sys.stdout) -> Command:
    async def command(client: AdminClient) -> int:
        full_id = await resolve_id(client, approval_id)
        approval = await client.decide(full_id, verdict, reason, category, remember)
        if as_json:
            _print_json(approval, out)
            return 0
        line = (f"{approval.get('status')} {full_id[:8]} ({approval.get('agent')}: {action(approval)}) "
                f"by {approval.get('decided_by')}")
        if approval.get("remembered_until"):
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(approval["remembered_until"])))
            line += f"; the same action passes without a hold until {until}"
        print(line, file=out)
        return 0

    return command


def set_paused(agent: str, paused: bool, reason: str | None, as_json: bool, out: TextIO = sys.stdout) -> Command:
    async def command(client: AdminClient) -> int:
        card = await client.set_paused(agent, paused, reason)
        if as_json:
            _print_json(card, out)
        elif card.get("paused"):
            state = card["paused"]
            print(f"paused {agent} (by {state.get('by')}: {state.get('reason')})", file=out)
        else:
            print(f"resumed {agent}", file=out)
        return 0

    return command


def trace_line(event: dict[str, Any]) -> str:
    """One compact line per trace event: time, agent, decision, action, status, rule, reason."""
    clock = time.strftime("%H:%M:%S", time.localtime(float(event.get("ts", time.time()))))
    kind = event.get("kind")
    if kind == "tail_dropped":
        return f"-- {event.get('count')} event(s) dropped: this tail did not keep up --"
    if kind is not None:
        return f"{clock} {event.get('agent') or '-'} {kind} {event.get('reason') or ''}".rstrip()
    decision = event.get("decision") or "-"
    outcome = (event.get("approval") or {}).get("outcome")
    if outcome:
        decision = f"{decision}({outcome})"
    status = str(event.get("status", "-"))
    if event.get("error"):
        status = f"{status} {event['error']}"
    # A call refused before it named an upstream (bad credential, unknown upstream) is shown by its request line.
    what = action(event) if event.get("upstream") else f"{event.get('method') or '-'} {event.get('path') or '-'}"
    parts = [clock, event.get("agent") or "-", decision, what, status, event.get("rule") or "-",
             event.get("reason") or ""]
    return " ".join(parts).rstrip()


def tail(agent: str | None, decision: str | None, as_json: bool, out: TextIO = sys.stdout) -> Command:
    async def command(client: AdminClient) -> int:
        async for data in client.traces(agent=agent, decision=decision):
            if as_json:
                print(data.decode(), file=out, flush=True)
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                print(data.decode(errors="replace"), file=out, flush=True)
                continue
            print(trace_line(event), file=out, flush=True)
        print("agent-gateway tail: the admin API ended the stream", file=sys.stderr)
        return 0

    return command
