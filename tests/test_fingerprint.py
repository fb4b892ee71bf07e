"""The call fingerprint (what an approval covers, stable across versions) and the loop detector's repeat key."""

from __future__ import annotations

import hashlib

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.incoming import Incoming
from gateway.pipeline import fingerprint, repeat_key

HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))


def incoming(method: str = "POST", path: str = "/chat/completions", query: str = "", body: bytes = b"{}") -> Incoming:
    return Incoming(method, path, query, HEADERS, body)


def test_fingerprint_is_sha256_of_the_nul_ended_parts_then_the_body_hash() -> None:
    """Held approvals are stored under it (in Redis too), so its definition must not drift between versions."""
    body = '{"amount": 25000, "payee": "Müller"}'.encode()
    expected = hashlib.sha256(b"bot\0payments\0POST\0/v1/payments\0dry_run=1\0" + hashlib.sha256(body).digest())
    assert fingerprint("bot", "payments", incoming(path="/v1/payments", query="dry_run=1", body=body)) == \
        expected.hexdigest()


@pytest.mark.parametrize("other", [
    ("bot2", "payments", incoming()), ("bot", "payments2", incoming()), ("bot", "payments", incoming(method="PUT")),
    ("bot", "payments", incoming(path="/chat")), ("bot", "payments", incoming(query="a=1")),
    ("bot", "payments", incoming(body=b"{ }")),
    # The separators keep parts apart: moving a character across a boundary is another call.
    ("bo", "tpayments", incoming()),
])
def test_every_part_of_the_call_changes_the_fingerprint_and_the_repeat_key(other: tuple[str, str, Incoming]) -> None:
    assert fingerprint(*other) != fingerprint("bot", "payments", incoming())
    assert repeat_key(*other) != repeat_key("bot", "payments", incoming())


def test_the_repeat_key_is_32_hex_digits_and_the_same_for_the_same_call() -> None:
    key = repeat_key("bot", "payments", incoming(body=b'{"amount": 1}'))
    assert len(key) == 32 and int(key, 16) >= 0
    assert repeat_key("bot", "payments", incoming(body=b'{"amount": 1}')) == key
