"""Path normalisation: one canonical path, classified and forwarded alike; tricks refused, never guessed at."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.paths import normalise, segments, split_upstream


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/./b/../c", "/a/c"),
        ("/a/b/./././c", "/a/b/c"),
        ("/a/b/c/../../d", "/a/d"),
        ("/a/..", "/"),
        ("/a/../", "/"),
        ("/.", "/"),
        ("/", "/"),
    ],
)
def test_normalise_resolves_dot_segments(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/erp/vendors/%2e%2e/payments", "/erp/payments"),
    ],
)
def test_normalise_resolves_encoded_dot_segments(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_normalise_keeps_dots_inside_a_segment_when_encoded() -> None:
    assert normalise("/a%2e%2e") == "/a.."
    assert normalise("/v1.2/x..y") == "/v1.2/x..y"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a//b", "/a/b"),
        ("//a///b////", "/a/b/"),
        ("//", "/"),
        ("///", "/"),
    ],
)
def test_normalise_collapses_duplicate_slashes(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [("/a%2Fb", "/a/b"), ("/a%2fb", "/a/b"), ("/a%2F%2Fb", "/a/b")])
def test_normalise_turns_encoded_slash_into_a_real_slash(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_normalise_encoded_slash_cannot_hide_a_dot_dot_segment() -> None:
    assert normalise("/erp/vendors%2F..%2Fpayments") == "/erp/payments"


def test_normalise_decodes_once_so_double_encoding_stays_literal() -> None:
    assert normalise("/%252e%252e/x") == "/%252e%252e/x"
    assert normalise("/a%252Fb") == "/a%252Fb"
    assert segments(normalise("/%252e%252e/x")) == ["%2e%2e", "x"]


@pytest.mark.parametrize(("raw", "expected"), [("/a/b/", "/a/b/"), ("/a/", "/a/"), ("/a/./", "/a/")])
def test_normalise_keeps_trailing_slash(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_normalise_reencodes_canonically() -> None:
    assert normalise("/a%20b") == "/a%20b"
    assert normalise("/%C3%BC") == "/%C3%BC"
    assert normalise("/\u00fc") == "/%C3%BC"
    assert normalise("/a%3Fb") == "/a%3Fb"
    assert normalise("/a%23b") == "/a%23b"
    assert normalise("/a%25b") == "/a%25b"
    assert normalise("/%7Euser/a:b@c") == "/~user/a:b@c"


@pytest.mark.parametrize(
    "raw",
    [
        "/..",
        "/../etc/passwd",
        "/a/../..",
        "/a/../../b",
        "/%2e%2e",
        "/%2e%2e/x",
        "/a/%2E%2E/%2e%2e/b",
        "/a%2F..%2F..%2Fb",
    ],
)
def test_normalise_refuses_climbing_above_root(raw: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalise(raw)
    assert caught.value.type == "bad_request"
    assert caught.value.status == 400
    assert "climbs above the root" in caught.value.message


@pytest.mark.parametrize(
    "raw",
    [
        "/a\\b",
        "/a%5Cb",
        "/a%5c..%5cb",
        "/a%00b",
        "/a\x00b",
        "/a%0Ab",
        "/a%0d%0aX-Injected:%201",
        "/a%09b",
        "/a%1Fb",
        "/a%7Fb",
    ],
)
def test_normalise_refuses_backslash_nul_and_control_characters(raw: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalise(raw)
    assert caught.value.type == "bad_request"
    assert "backslash or a control character" in caught.value.message


@pytest.mark.parametrize("raw", ["/%ff", "/a%C3", "/%C3%28", "/%80abc", "/%ED%A0%80"])
def test_normalise_refuses_invalid_utf8(raw: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalise(raw)
    assert caught.value.type == "bad_request"
    assert "UTF-8" in caught.value.message


@pytest.mark.parametrize("raw", ["", "a/b", "%2Fa", "http://evil/a"])
def test_normalise_refuses_path_without_leading_slash(raw: str) -> None:
    with pytest.raises(GatewayError) as caught:
        normalise(raw)
    assert caught.value.type == "bad_request"


TRICKY = [
    "/",
    "//",
    "/a/./b/../c/",
    "/a//b///c",
    "/a%2Fb%2f..%2Fc",
    "/%252e%252e/%252F",
    "/%2525252e",
    "/a%20b/%C3%BC/\u00fc",
    "/a%3Fb%23c",
    "/a..b/...//....",
    "/x/%2e/%2E%2e/y/",
    "/~user/a:b@c;d=e,f+g!$&'()*",
    "/a%25/b%252/",
    "/%41%42%43",
    "/a/b/..",
    "/%E2%80%AE/rtl",
]


@pytest.mark.parametrize("raw", TRICKY)
def test_normalise_is_idempotent(raw: str) -> None:
    once = normalise(raw)
    assert normalise(once) == once


@pytest.mark.parametrize("raw", TRICKY)
def test_normalise_output_has_no_dot_or_empty_segments(raw: str) -> None:
    once = normalise(raw)
    assert "//" not in once
    assert "/./" not in once + "/"
    assert "/../" not in once + "/"
    assert once.startswith("/")


def test_normalise_decodes_unreserved_characters() -> None:
    assert normalise("/%41%42%43") == "/ABC"


def test_split_upstream_takes_first_segment() -> None:
    assert split_upstream("/openai/chat/completions") == ("openai", "/chat/completions")
    assert split_upstream("/crm-tools/mcp") == ("crm-tools", "/mcp")


def test_split_upstream_keeps_trailing_slash_below_upstream() -> None:
    assert split_upstream("/erp/vendors/") == ("erp", "/vendors/")
    assert split_upstream("/erp/") == ("erp", "/")


def test_split_upstream_without_rest_gives_root() -> None:
    assert split_upstream("/openai") == ("openai", "/")
    assert split_upstream("/") == ("", "/")


def test_segments_decodes_each_segment() -> None:
    assert segments("/a%20b/%C3%BC/c") == ["a b", "\u00fc", "c"]
    assert segments("/a%3Fb/") == ["a?b"]


def test_segments_of_root_is_empty() -> None:
    assert segments("/") == []


def test_segments_of_normalised_encoded_slash_are_separate() -> None:
    assert segments(normalise("/vendors%2F42")) == ["vendors", "42"]
