"""`--help` and the refusals a user meets first answer without importing torch (seconds of imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Runs each command in one fresh interpreter, in order, and reports its exit code and whether torch (or
# zarr) had been imported by then: a command that imported it would show it for itself and every later one.
PROBE = """
import contextlib, io, json, sys
from pipelines.cli import app
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            app(args)
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"args": args, "code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules,
                    "zarr": "zarr" in sys.modules})
print(json.dumps(results))
"""


def probe(*commands: list[str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_help_and_first_refusals_import_no_torch(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.zarr")
    run = str(tmp_path / "run")
    help_only, *refusals = probe(
        ["--help"],
        ["train", "--help"],
        ["build", "--help"],
        ["train", "--out", run, "--recipe", "no-such-recipe"],
        ["train", "--out", run, "--student", "resnet8", "--cache", missing],
        ["train", "--out", run, "--student", "resnet8", "--cache", missing, "--feature-loss", "mse", "--alpha", "0.5"],
        ["info", missing],
        ["recipes"],
    )
    assert help_only["code"] == 0 and not help_only["zarr"], "--help does not even open the cache library"
    for result in refusals:
        assert not result["torch"], f"{result['args']} imported torch"
    for result in refusals[2:6]:
        assert result["code"] == 2 and len(result["stderr"].strip().splitlines()) == 1, result
    assert "unknown recipe 'no-such-recipe'" in refusals[2]["stderr"]
    assert all(f"no cache at {missing}" in r["stderr"] for r in refusals[3:6])
