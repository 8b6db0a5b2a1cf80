"""The command line: the demo runs end to end (a smoke test, so it cannot rot)."""

from __future__ import annotations

import pytest

from parall_bridge.cli import main


def test_demo_runs_the_gateway_and_traces_what_happened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "ready  gateway connected" in out
    routes = [line.split("-> ")[-1] for line in out.splitlines() if "  route  " in line]
    assert routes.count("main") == 1
    assert routes.count("new_fork") == 2  # the group mention and the task ran on forks
    assert routes.count("buffer_main") == 3  # the burst waited for main...
    assert "3 event(s)" in out  # ...and coalesced into one turn
    assert "fork fork-1 released: 1 handled" in out
    assert "for _orchestrator" in out  # the synthetic wake-up delivering fork results
    assert "  ack    " in out
    assert "pending dispatch items left: 0" in out
    assert ": completed" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2
