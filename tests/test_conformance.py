"""The conformance statement says what the code does: its generated tables match the code's own."""

from __future__ import annotations

from pathlib import Path

from triagenode.daemon.conformance import END, START, generated_tables

DOCUMENT = Path(__file__).parent.parent / "docs" / "conformance.md"


def test_conformance_statement_tables_match_the_code() -> None:
    text = DOCUMENT.read_text()
    section = text[text.index(START) : text.index(END) + len(END)]
    assert section == generated_tables(), "run: python -m triagenode.daemon.conformance --write docs/conformance.md"


def test_every_status_and_transfer_syntax_is_documented() -> None:
    from triagenode.daemon.contexts import ACCEPTED_TRANSFER_SYNTAXES
    from triagenode.daemon.statuses import StoreStatus

    text = DOCUMENT.read_text()
    for status in StoreStatus:
        assert f"`0x{int(status):04X}`" in text
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        assert f"`{syntax}`" in text
    assert "TID 1500" in text and "111012" in text
