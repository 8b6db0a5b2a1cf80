"""The ``parall_server`` pytest plugin, in a pytest of its own (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parall_bridge.testing import FakeParallServer

GUIDE = Path(__file__).parents[2] / "docs" / "testing.md"
GUIDE_EXAMPLE = Path(__file__).with_name("test_guide_example.py")


def run_pytest(tmp_path: Path, test_source: str, *, without_pytest_asyncio: bool) -> str:
    """Run pytest on ``test_source`` in a subprocess; without pytest-asyncio, a module of
    that name that fails to import shadows it, as in an environment that lacks it."""
    test_file = tmp_path / "test_user.py"
    test_file.write_text(textwrap.dedent(test_source))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(test_file)]
    env = dict(os.environ)
    if without_pytest_asyncio:
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "pytest_asyncio.py").write_text(
            "raise ImportError(\"No module named 'pytest_asyncio'\")\n"
        )
        env["PYTHONPATH"] = str(shadow)
        command[3:3] = ["-p", "no:asyncio"]  # its entry point would import it too
    done = subprocess.run(  # noqa: S603 (our own interpreter and arguments)
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_without_pytest_asyncio_only_the_fixture_fails_and_says_why(tmp_path: Path) -> None:
    out = run_pytest(
        tmp_path,
        """
        def test_unrelated():
            assert True

        def test_wants_the_emulator(parall_server):
            pass
        """,
        without_pytest_asyncio=True,
    )
    assert out.startswith("exit 1"), out
    assert "1 passed" in out, out
    assert "the parall_server fixture needs pytest-asyncio" in out, out


def test_with_pytest_asyncio_the_fixture_serves_an_emulator(tmp_path: Path) -> None:
    out = run_pytest(
        tmp_path,
        """
        import pytest

        @pytest.mark.asyncio
        async def test_wants_the_emulator(parall_server):
            assert parall_server.url.startswith("http://127.0.0.1:")
        """,
        without_pytest_asyncio=False,
    )
    assert out.startswith("exit 0"), out


@pytest.mark.asyncio
async def test_the_fixture_is_a_started_emulator(parall_server: FakeParallServer) -> None:
    assert parall_server.url.startswith("http://127.0.0.1:")


def guide_block(language: str, after: str) -> str:
    """The first ``language`` code block of docs/testing.md after the heading ``after``."""
    section = GUIDE.read_text().split(after, 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_testing_guide_shows_its_example_test_as_it_is() -> None:
    """The guide's whole-loop example is test_guide_example.py, which the suite runs."""
    assert guide_block("python", "## Testing your runtime") == GUIDE_EXAMPLE.read_text()


def test_the_guide_example_passes_with_the_guide_settings_and_no_warning(tmp_path: Path) -> None:
    """The example in a project of its own, with the pytest settings the guide shows, as a
    user would run it: it passes, and pytest-asyncio has nothing to warn about."""
    settings = guide_block("toml", "## Setting up pytest")
    assert "asyncio_default_fixture_loop_scope" in settings
    (tmp_path / "pyproject.toml").write_text(settings)
    out = run_pytest(tmp_path, GUIDE_EXAMPLE.read_text(), without_pytest_asyncio=False)
    assert out.startswith("exit 0"), out
    assert "1 passed" in out, out
    assert "warning" not in out.lower(), out
