"""The tables of the DICOM Conformance Statement, generated from the code so that they cannot drift.

``docs/conformance.md`` holds the prose; the part between the ``generated``
markers is this module's output. A test checks that the two agree;
``python -m triagenode.daemon.conformance --write docs/conformance.md`` refreshes it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from triagenode.daemon.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_TRANSFER_SYNTAXES,
)
from triagenode.daemon.delivery import OTHER_REPORT_CLASSES, REPORT_CONTEXTS, REPORT_TRANSFER_SYNTAXES
from triagenode.daemon.receiver import MAX_PDU_SIZE, REQUEST_TIMEOUT_S
from triagenode.daemon.statuses import WHEN_SENT, StoreStatus
from triagenode.daemon.tls import BCP195_CIPHERS, HANDSHAKE_TIMEOUT_S

START = "<!-- generated:start (python -m triagenode.daemon.conformance --write docs/conformance.md) -->"
END = "<!-- generated:end -->"


def _syntaxes(uids: tuple[UID, ...]) -> str:
    return "<br>".join(f"{UID(uid).name} `{uid}`" for uid in uids)


def generated_tables() -> str:
    lines = [START, "", "### Verification and Storage SCP: accepted presentation contexts", ""]
    lines += ["| SOP Class | UID | Role | Transfer Syntaxes |", "|---|---|---|---|"]
    lines.append(
        f"| {UID(VERIFICATION_SOP_CLASS).name} | `{VERIFICATION_SOP_CLASS}` | SCP | "
        f"{_syntaxes(VERIFICATION_TRANSFER_SYNTAXES)} |"
    )
    lines += [f"| {UID(uid).name} | `{uid}` | SCP | all of table T-1 |" for uid in STORAGE_SOP_CLASSES]
    lines += ["", "**Table T-1**: transfer syntaxes accepted for every storage SOP class (stored as received).", ""]
    lines += ["| Transfer Syntax | UID |", "|---|---|"]
    lines += [f"| {UID(uid).name} | `{uid}` |" for uid in ACCEPTED_TRANSFER_SYNTAXES]
    lines += ["", "### Storage SCU (reports): proposed presentation contexts", ""]
    lines += ["| SOP Class | UID | Role | Transfer Syntaxes |", "|---|---|---|---|"]
    lines += [f"| {UID(uid).name} | `{uid}` | SCU | {_syntaxes(REPORT_TRANSFER_SYNTAXES)} |" for uid in REPORT_CONTEXTS]
    lines += [
        f"| {UID(uid).name} | `{uid}` | SCU, proposed when such a report is sent | "
        f"{_syntaxes(REPORT_TRANSFER_SYNTAXES)} |"
        for uid in OTHER_REPORT_CLASSES
    ]
    lines += ["", "### C-STORE response statuses of the Storage SCP", ""]
    lines += ["| Status | Name | Sent when |", "|---|---|---|"]
    for status in StoreStatus:
        meaning = WHEN_SENT[status]
        lines.append(f"| `0x{int(status):04X}` | {status.name.replace('_', ' ').lower()} | {meaning} |")
    lines += ["", "### Association parameters", ""]
    lines += [
        "| Parameter | Value |",
        "|---|---|",
        f"| Implementation Class UID | `{PYNETDICOM_IMPLEMENTATION_UID}` |",
        f"| Implementation Version Name | `{PYNETDICOM_IMPLEMENTATION_VERSION}` |",
        f"| Maximum PDU size received | {MAX_PDU_SIZE} bytes |",
        "| Maximum simultaneous associations (acceptor) | `[node].max_associations` (default 10), counted from "
        "the A-ASSOCIATE-RQ on; beyond it: A-ASSOCIATE-RJ rejected-transient (local limit exceeded) |",
        "| Maximum simultaneous associations per calling AE title | `[node].max_associations_per_peer` (default 5) "
        "or the `[[peers]]` entry's `max_associations`; beyond it: A-ASSOCIATE-RJ rejected-transient (local limit "
        "exceeded) |",
        f"| TLS handshake timeout (TLS port) | {HANDSHAKE_TIMEOUT_S} s after the connection opens; then the "
        "connection is closed and the failure logged and audited |",
        "| TLS versions and TLS 1.2 cipher suites | TLS 1.2 and 1.3 (`[tls].minimum_version`); "
        + ", ".join(f"`{suite}`" for suite in BCP195_CIPHERS.split(":")) + " |",
        f"| A-ASSOCIATE-RQ timeout (ARTIM) | {REQUEST_TIMEOUT_S} s after the connection opens; a connection "
        "closed before its request ends at once and never counts |",
        "| Asynchronous operations window | 1 / 1 (not supported) |",
        "",
        END,
    ]
    return "\n".join(lines)


def refresh(document: Path) -> bool:
    """Rewrite the generated part of ``document``; True when it changed."""
    text = document.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{document} has no generated section ({START} ... {END})")
    updated = pattern.sub(lambda _m: generated_tables(), text)
    if updated != text:
        document.write_text(updated)
    return updated != text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="refresh the generated section of this document")
    args = parser.parse_args()
    if args.write:
        print("updated" if refresh(args.write) else "up to date")
    else:
        sys.stdout.write(generated_tables() + "\n")


if __name__ == "__main__":
    main()
