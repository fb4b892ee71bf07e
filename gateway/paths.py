"""Path normalisation, done once before any rule sees a path; the normalised path is what is forwarded."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from .errors import bad_request

# Characters kept as-is when re-encoding a normalised path (RFC 3986 pchar minus '%', plus '/').
_SAFE = "/:@!$&'()*+,;=-._~"
# A path made only of those and ASCII letters and digits is already in the form `normalise` produces.
_CANONICAL = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~]*")


def normalise(raw_path: str) -> str:
    """Percent-decode once, drop empty and `.` segments, resolve `..`, and re-encode canonically.

    The result has no `//`, `/./` or `/../`; `%2F` becomes a real `/` (so the path that is classified
    is segment-for-segment the one the upstream sees). Paths that try to climb above the root, or carry
    NUL, backslashes or control characters, are refused rather than guessed at.
    """
    if not raw_path.startswith("/"):
        raise bad_request("request path must start with '/'")
    if _CANONICAL.fullmatch(raw_path) and "//" not in raw_path and "/." not in raw_path:
        return raw_path  # the common case: nothing to decode, no empty or dot segments (and the same result)
    try:
        decoded = unquote(raw_path, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise bad_request("request path is not valid UTF-8 after percent-decoding") from exc
    if "\\" in decoded or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise bad_request("request path contains a backslash or a control character")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise bad_request("request path climbs above the root with '..'")
            segments.pop()
            continue
        segments.append(segment)
    trailing = "/" if decoded.endswith("/") and segments else ""
    return "/" + "/".join(quote(s, safe=_SAFE) for s in segments) + trailing


def split_upstream(path: str) -> tuple[str, str]:
    """`/openai/chat/completions` -> (`openai`, `/chat/completions`); the first segment names the upstream."""
    head, _, rest = path[1:].partition("/")
    return head, "/" + rest


def segments(path: str) -> list[str]:
    """The decoded segments of a normalised path."""
    return [unquote(s) for s in path.split("/") if s]
