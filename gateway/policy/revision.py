"""Where a rule set to compare comes from: a directory, or `REV:PATH`, a directory as a git revision has it.

A revision's tree is materialised into a temporary directory (`git archive`), so the real loader reads it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RuleSource", "SourceError", "open_source"]

GIT_TIMEOUT = 60.0  # seconds for one git command; a huge repository can take a while to archive


class SourceError(Exception):
    """A rules source that cannot be read: no such directory, no git, or no such revision or path."""


@dataclass(frozen=True, slots=True)
class RuleSource:
    """A rules directory on disk; `label` is how reports name it (`rules`, `HEAD~1:rules`)."""

    label: str
    directory: Path


@contextmanager
def open_source(spec: str) -> Iterator[RuleSource]:
    """`spec` as a directory on disk; an existing directory wins over a `REV:PATH` reading of the same text."""
    path = Path(spec)
    if path.is_dir():
        yield RuleSource(spec, path)
        return
    if ":" not in spec:
        what = "is not a directory" if path.exists() else "does not exist"
        raise SourceError(f"{spec} {what}; give a rules directory or a git revision as REV:PATH (e.g. HEAD~1:rules)")
    rev, _, rel = spec.partition(":")
    if not rev:
        raise SourceError(f"{spec}: no revision before ':'; use REV:PATH, e.g. HEAD~1:rules")
    with tempfile.TemporaryDirectory(prefix="agent-gateway-rules-") as tmp:
        _materialise(rev, rel or ".", Path(tmp), spec)
        yield RuleSource(spec, Path(tmp))


def _materialise(rev: str, rel: str, into: Path, spec: str) -> None:
    top, inside = _locate(rel, spec)
    if not _git(top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False):
        raise SourceError(f"{spec}: unknown revision '{rev}' in the git repository at {top}")
    tree = f"{rev}:{inside}" if inside else f"{rev}^{{tree}}"
    if _git(top, "cat-file", "-t", tree, check=False).strip() != b"tree":
        raise SourceError(f"{spec}: revision '{rev}' has no directory '{inside or '.'}' in {top}")
    _extract(_git(top, "archive", "--format=tar", tree), into)


def _extract(archive: bytes, into: Path) -> None:
    """Regular files only: a rules directory needs no links, and git archive writes no absolute or `..` names."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or Path(member.name).is_absolute() or ".." in parts:
                continue
            data = tar.extractfile(member)
            if data is not None:
                (into / Path(*parts)).parent.mkdir(parents=True, exist_ok=True)
                (into / Path(*parts)).write_bytes(data.read())


def _locate(rel: str, spec: str) -> tuple[Path, str]:
    """The repository holding `rel` (relative to the current directory) and `rel` relative to its top."""
    target = Path(os.path.abspath(rel))
    anchor = target
    while not anchor.is_dir():  # the path may exist only in the revision, not in the working tree
        anchor = anchor.parent
    top_text = _git(anchor, "rev-parse", "--show-toplevel", check=False).decode().strip()
    if not top_text:
        raise SourceError(f"{spec}: {anchor} is not inside a git repository")
    top = Path(top_text)
    resolved = anchor.resolve() / target.relative_to(anchor)
    try:
        inside = resolved.relative_to(top.resolve()).as_posix()
    except ValueError:
        raise SourceError(f"{spec}: {rel} is outside the git repository at {top}") from None
    return top, "" if inside == "." else inside


def _git(cwd: Path, *args: str, check: bool = True) -> bytes:
    """Run git in `cwd`; its stdout, or b"" when it fails and `check` is off."""
    git = shutil.which("git")
    if git is None:
        raise SourceError("git is not installed or not on PATH; it is needed to read REV:PATH sources")
    try:
        done = subprocess.run([git, "-C", str(cwd), *args], capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"git {args[0]} failed: {exc}") from exc
    if done.returncode != 0:
        if check:
            message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise SourceError(f"git {args[0]} failed: {message}")
        return b""
    return done.stdout
