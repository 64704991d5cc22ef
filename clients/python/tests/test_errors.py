"""Every error code of docs/PROTOCOL.md §6 has its own exception class."""

from __future__ import annotations

import re
from pathlib import Path

import roster_client
from roster_client import errors

PROTOCOL = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"


def test_every_documented_code_has_its_exception() -> None:
    table = PROTOCOL.read_text().split("## 6. Error codes", 1)[1].split("\n## ", 1)[0]
    codes = {int(c): name for c, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", table, re.M)}
    assert len(codes) >= 19, codes
    for code, name in codes.items():
        error = errors.from_wire(code, "why")
        assert type(error).__name__ == name, (code, name, error)
        assert error.code == code and error.message == "why"
        assert isinstance(error, roster_client.RosterError)
        assert getattr(roster_client, name) is type(error), f"{name} is exported"


def test_an_unknown_code_keeps_its_number() -> None:
    error = errors.from_wire(250, "from a newer server")
    assert type(error) is roster_client.RosterError
    assert error.code == 250 and "from a newer server" in str(error)
