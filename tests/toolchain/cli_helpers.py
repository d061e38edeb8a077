"""Running `edge-convert` in tests, the way a user does: arguments in, exit code and text out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from toolchain.cli import cli


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: str | Path) -> tuple[Result, dict[str, Any]]:
    result = run_cli(*args, "--json")
    return result, json.loads(result.stdout)


def assert_clean_failure(result: Result, code: int, message: str, out: Path | None = None) -> None:
    """One clear line on stderr, the right exit code, no traceback, and no partial bundle."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if "edge-convert: error:" in line]
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if out is not None:
        assert not out.exists()
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == []
