"""The `richkd-cache` CLI run in-process, as the tests drive it (one helper for every test file)."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app


def invoke(*args: object):
    """Run the CLI with these arguments (paths and numbers become strings); exceptions propagate."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
