"""The command line: the demo runs end to end (a smoke test, so it cannot rot)."""

from __future__ import annotations

import pytest

from parall_bridge.cli import main


def test_demo_runs_and_says_what_it_did(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "authenticated as Demo Agent" in out
    assert "uploaded checklist.txt" in out
    assert "dispatch queue: 2 pending item(s)" in out
    assert "acked them; 0 left" in out
    assert out.rstrip().endswith("demo finished")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2
