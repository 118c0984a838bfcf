"""A cached run is checked against the machine's real limits before a row is read: the cgroup v2
memory.max of the process, RLIMIT_AS (ulimit -v), MemAvailable and the disk the local copy needs; each
refusal is one line, and nothing is copied or written."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from clirun import invoke
from pipelines import memory

FAST = ["--student", "resnet8", "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet"]


def fake_host(root: Path, *, memory_max: str = "max", available_kb: int = 64 << 20) -> None:
    """/proc and a cgroup v2 tree as Linux lays them out, for a process in cgroup /job."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal: {available_kb * 2} kB\nMemAvailable: {available_kb} kB\n")
    (root / "proc" / "self" / "status").write_text("VmSize:\t 4000000 kB\nRssAnon:\t  500000 kB\nRssShmem:\t 0 kB\n")
    (root / "proc" / "self" / "cgroup").write_text("0::/job\n")
    (root / "cgroup" / "job").mkdir(parents=True)
    (root / "cgroup" / "job" / "memory.max").write_text(memory_max + "\n")
    (root / "cgroup" / "job" / "memory.stat").write_text("anon 512000000\nfile 90000000\nshmem 0\n")


@pytest.fixture()
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(memory, "PROC", tmp_path / "host" / "proc")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "host" / "cgroup")
    monkeypatch.setenv("RICHKD_CACHE_LOCAL", str(tmp_path / "local"))
    return tmp_path / "host"


def refused(result, tmp_path: Path) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert not list((tmp_path / "local").rglob("*.npy"))  # nothing copied
    assert not (tmp_path / "run" / "last.pth").exists()
    return lines[0]


def test_the_cgroups_memory_max_is_honoured_in_one_line(digits_cache: Path, host: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the process holds 512 MB (RssAnon 500,000 kB), all its cgroup's: a 510 MB memory.max leaves no room
    fake_host(host, memory_max=str(510_000_000))
    line = refused(invoke("train", "--cache", digits_cache, *FAST, "--out", tmp_path / "run"), tmp_path)
    assert "memory.max" in line and "--feature-loss none" in line
    fake_host_ok = host.parent / "ok"
    fake_host(fake_host_ok)  # the same machine without the limit: the run trains
    monkeypatch.setattr(memory, "PROC", fake_host_ok / "proc")
    monkeypatch.setattr(memory, "CGROUP", fake_host_ok / "cgroup")
    assert invoke("train", "--cache", digits_cache, *FAST, "--out", tmp_path / "run").exit_code == 0


def test_rlimit_as_is_honoured_in_one_line(digits_cache: Path, host: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake_host(host)  # VmSize 4 GB: a 4 GB address-space limit leaves no room for the mapped rows
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (4_000_000 * 1024, resource.RLIM_INFINITY))
    line = refused(invoke("train", "--cache", digits_cache, *FAST, "--out", tmp_path / "run"), tmp_path)
    assert "RLIMIT_AS" in line and "ulimit -v" in line


def test_the_real_address_space_limit_is_read() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 1 << 45 if hard == resource.RLIM_INFINITY else hard  # above anything this process uses
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        limits = memory.host_limits()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert limits.address_space == limit and limits.vm_size > 0 and limits.private > 0


def test_a_local_copy_without_disk_room_is_one_line(digits_cache: Path, host: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import cache_store.local

    fake_host(host)
    monkeypatch.setattr(cache_store.local, "disk_free", lambda folder: 1000)
    line = refused(invoke("train", "--cache", digits_cache, *FAST, "--out", tmp_path / "run"), tmp_path)
    assert "RICHKD_CACHE_LOCAL" in line and "free there" in line
