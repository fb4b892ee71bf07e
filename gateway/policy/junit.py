"""JUnit XML for `agent-gateway rules test --junit FILE`, in the shape Jenkins and GitLab read: one testsuite per
case file, one testcase per case (classname = the case file, name = the case name)."""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["CaseReport", "write_junit"]

SUITES_NAME = "agent-gateway rules test"
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")  # no XML 1.0 escape exists


@dataclass(frozen=True, slots=True)
class CaseReport:
    """One testcase: passed when neither `failure` nor `error` is set."""

    classname: str  # the case file
    name: str
    seconds: float
    failure: str | None = None  # the first mismatch, e.g. "decision: expected 'allow', got 'deny'"
    error: str | None = None  # the case could not run (a broken case file, rules that do not load)
    details: str = ""  # the full report of a failure or error


def write_junit(path: str | Path, reports: Sequence[CaseReport]) -> None:
    root = ET.Element("testsuites", {"name": SUITES_NAME, **_counts(reports)})
    stamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    host = socket.gethostname()
    for classname in dict.fromkeys(r.classname for r in reports):
        mine = [r for r in reports if r.classname == classname]
        attributes = {"name": _xml(classname), **_counts(mine), "skipped": "0", "timestamp": stamp, "hostname": host}
        suite = ET.SubElement(root, "testsuite", attributes)
        for report in mine:
            case = ET.SubElement(suite, "testcase", classname=_xml(classname), name=_xml(report.name),
                                 time=f"{report.seconds:.6f}")
            if report.error is not None:
                ET.SubElement(case, "error", message=_xml(report.error), type="error").text = _xml(report.details)
            elif report.failure is not None:
                failure = ET.SubElement(case, "failure", message=_xml(report.failure), type="mismatch")
                failure.text = _xml(report.details)
    ET.indent(root)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)


def _counts(reports: Sequence[CaseReport]) -> dict[str, str]:
    errors = sum(r.error is not None for r in reports)
    failures = sum(r.error is None and r.failure is not None for r in reports)
    return {"tests": str(len(reports)), "failures": str(failures), "errors": str(errors),
            "time": f"{sum(r.seconds for r in reports):.6f}"}


def _xml(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)
