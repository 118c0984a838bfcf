"""Sharp edges a new user meets, through the CLI: the packed zip's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clirun import invoke


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_pack_writes_the_zip_like_any_new_file(tmp_path: Path, digits_cache: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        result = invoke("pack", digits_cache, tmp_path / "digits.zip")
        (tmp_path / "plain").write_text("")  # how any file comes out under this umask
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    mode = stat.S_IMODE((tmp_path / "digits.zip").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask  # 0644 under 022
    assert not list(tmp_path.glob("*.partial"))
