"""toolfilter: `tools/list` answers cut down to the agent's tools, by JSON-RPC id; everything else untouched."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.toolfilter import filter_tools

ALLOWED = {"lookup_account", "send_email"}


def keep(name: str) -> bool:
    return name in ALLOWED


def tools(*tool_names: str) -> list[dict[str, Any]]:
    return [{"name": n, "description": f"{n} tool", "inputSchema": {"type": "object"}} for n in tool_names]


def listing(msg_id: Any, *tool_names: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"tools": tools(*tool_names), "nextCursor": "c2"}}


ALL = ("lookup_account", "send_email", "delete_account", "export_everything")


def names_in(message: dict[str, Any]) -> list[str]:
    return [t["name"] for t in message["result"]["tools"]]


def test_filter_json_answer_keeps_only_allowed_tools() -> None:
    out = orjson.loads(filter_tools(orjson.dumps(listing(1, *ALL)), "application/json", (1,), keep))
    assert out == {"jsonrpc": "2.0", "id": 1,
                   "result": {"tools": tools("lookup_account", "send_email"), "nextCursor": "c2"}}


def test_filter_keeps_order_and_tool_fields() -> None:
    body = orjson.dumps(listing("a", "send_email", "delete_account", "lookup_account"))
    out = orjson.loads(filter_tools(body, "application/json; charset=utf-8", ("a",), keep))
    assert out["result"]["tools"] == tools("send_email", "lookup_account")


def test_filter_json_answer_with_other_id_is_untouched() -> None:
    out = orjson.loads(filter_tools(orjson.dumps(listing(2, *ALL)), "application/json", (1,), keep))
    assert names_in(out) == list(ALL)


def test_filter_matches_id_by_value_and_type() -> None:
    body = orjson.dumps(listing("1", *ALL))
    assert names_in(orjson.loads(filter_tools(body, "application/json", (1,), keep))) == list(ALL)
    assert names_in(orjson.loads(filter_tools(body, "application/json", ("1",), keep))) == sorted(ALLOWED)


def test_filter_batch_answer_filters_each_listed_id() -> None:
    batch = [listing(1, *ALL), {"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "x"}]}},
             listing(3, *ALL), listing(4, *ALL)]
    out = orjson.loads(filter_tools(orjson.dumps(batch), "application/json", (1, 4), keep))
    assert names_in(out[0]) == ["lookup_account", "send_email"]
    assert out[1] == batch[1]
    assert names_in(out[2]) == list(ALL)
    assert names_in(out[3]) == ["lookup_account", "send_email"]


def test_filter_leaves_errors_and_odd_results_untouched() -> None:
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "nope"}}
    no_tools = {"jsonrpc": "2.0", "id": 1, "result": {}}
    tools_not_list = {"jsonrpc": "2.0", "id": 1, "result": {"tools": {"name": "delete_account"}}}
    result_not_object = {"jsonrpc": "2.0", "id": 1, "result": ["delete_account"]}
    for message in (error, no_tools, tools_not_list, result_not_object):
        assert orjson.loads(filter_tools(orjson.dumps(message), "application/json", (1,), keep)) == message


def test_filter_drops_malformed_tool_entries() -> None:
    message = {"jsonrpc": "2.0", "id": 1,
               "result": {"tools": ["lookup_account", {"description": "no name"}, {"name": "send_email"}, None]}}
    out = orjson.loads(filter_tools(orjson.dumps(message), "application/json", (1,), keep))
    assert out["result"]["tools"] == [{"name": "send_email"}]


def test_filter_empty_allow_set_empties_the_list() -> None:
    out = orjson.loads(filter_tools(orjson.dumps(listing(1, *ALL)), "application/json", (1,), lambda _: False))
    assert out["result"]["tools"] == []


def test_filter_sse_rewrites_only_data_lines_of_listed_ids() -> None:
    notice = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}}
    body = (b"event: message\nid: ev-1\ndata: " + orjson.dumps(notice) + b"\n\n"
            b"event: message\nid: ev-2\ndata: " + orjson.dumps(listing(7, *ALL)) + b"\n\n"
            b": keep-alive comment\n\n")
    out = filter_tools(body, "text/event-stream", (7,), keep)
    lines = out.split(b"\n")
    assert lines[0:2] == [b"event: message", b"id: ev-1"]
    assert orjson.loads(lines[2][5:]) == notice
    assert lines[3:6] == [b"", b"event: message", b"id: ev-2"]
    assert lines[6].startswith(b"data: ")
    assert names_in(orjson.loads(lines[6][6:])) == ["lookup_account", "send_email"]
    assert lines[7:] == [b"", b": keep-alive comment", b"", b""]


def test_filter_sse_other_ids_pass_unchanged() -> None:
    body = b"event: message\ndata: " + orjson.dumps(listing(8, *ALL)) + b"\n\n"
    out = filter_tools(body, "text/event-stream", (7,), keep)
    assert names_in(orjson.loads(out.split(b"\n")[1][6:])) == list(ALL)


def test_filter_sse_empty_data_line_passes_unchanged() -> None:
    body = b"data:\ndata:   \nretry: 1000\n\n"
    assert filter_tools(body, "text/event-stream", (1,), keep) == body


def test_filter_sse_with_batch_in_data_line() -> None:
    body = b"data: " + orjson.dumps([listing(1, *ALL), listing(2, *ALL)]) + b"\n\n"
    out = orjson.loads(filter_tools(body, "text/event-stream", (2,), keep).split(b"\n")[0][6:])
    assert [names_in(m) for m in out] == [list(ALL), ["lookup_account", "send_email"]]


@pytest.mark.parametrize("body", [b"", b"not json", b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": [',
                                  b"\xff\xfe"])
def test_filter_bad_json_raises(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        filter_tools(body, "application/json", (1,), keep)
    with pytest.raises(ValueError):
        filter_tools(body, "application/json", (1,), keep)


def test_filter_bad_json_in_sse_data_line_raises() -> None:
    body = b"event: message\ndata: " + orjson.dumps(listing(1, *ALL))[:-3] + b"\n\n"
    with pytest.raises(orjson.JSONDecodeError):
        filter_tools(body, "text/event-stream", (1,), keep)


def test_filter_sse_content_type_is_case_insensitive() -> None:
    body = b"data: " + orjson.dumps(listing(1, *ALL)) + b"\n\n"
    out = filter_tools(body, "Text/Event-Stream; charset=utf-8", (1,), keep)
    assert names_in(orjson.loads(out.split(b"\n")[0][6:])) == ["lookup_account", "send_email"]
