"""What a cached run will hold, checked against the machine's real limits before a row is read.

A run holds three kinds of memory: its private working set (anonymous pages: the model, the optimiser,
the objective's memory banks, the epoch's draws, the batches in flight, the statistics pass's chunk), the
shared local copy of the cache's rows (file pages of a mapping: shared by every run on the machine, given
back by the kernel under pressure, but counted whole in the address space), and, with `--cache-device
cuda`, the compact rows on the GPU. Each is compared with the limit that applies to it:

- private: MemAvailable (/proc/meminfo) and the cgroup v2 `memory.max` of the process (less what the rest
  of the cgroup already holds privately);
- address space: RLIMIT_AS against the process's VmSize plus the mapping plus the private growth;
- disk: the part of the local copy not made yet, against the free space where it goes;
- device: the rows on the GPU against its free memory.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.summary import human_bytes
from richkd_cache.errors import ConfigError

PROC = Path("/proc")  # where /proc/meminfo, /proc/self/status and /proc/self/cgroup are read
CGROUP = Path("/sys/fs/cgroup")  # the cgroup v2 hierarchy


@dataclass(frozen=True)
class HostLimits:
    """What this machine lets the process have; None where it sets no limit (or cannot be asked)."""

    available: int | None  # MemAvailable
    cgroup_max: int | None  # memory.max of the process's cgroup
    cgroup_other: int = 0  # anonymous memory the rest of that cgroup holds
    address_space: int | None = None  # RLIMIT_AS (soft)
    vm_size: int = 0  # the process's address space now
    private: int = 0  # the process's private memory now (RssAnon + RssShmem)


@dataclass(frozen=True)
class RunNeeds:
    """What the run will add: private bytes, the mapped copy, disk for its missing part, GPU bytes."""

    private: int
    mapped: int
    disk: int = 0
    disk_free: int | None = None
    device: int = 0
    device_free: int | None = None
    local_folder: str = ""


def _status_kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def cgroup_folder() -> Path | None:
    """The process's cgroup v2 folder ("0::/path" in /proc/self/cgroup)."""
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return CGROUP / line[3:].lstrip("/")
    return None


def host_limits() -> HostLimits:
    try:
        status = (PROC / "self" / "status").read_text()
        meminfo = (PROC / "meminfo").read_text()
    except OSError:
        status = meminfo = ""
    own = _status_kb(status, "RssAnon") + _status_kb(status, "RssShmem")
    available = _status_kb(meminfo, "MemAvailable") or None
    folder = cgroup_folder()
    cgroup_max = cgroup_other = None
    if folder is not None:
        cgroup_max = _read_int(folder / "memory.max")
        try:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
            cgroup_other = max(int(stat.get("anon", 0)) + int(stat.get("shmem", 0)) - own, 0)
        except (OSError, ValueError):
            cgroup_other = 0
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return HostLimits(available, cgroup_max, cgroup_other or 0, None if soft == resource.RLIM_INFINITY else soft,
                      _status_kb(status, "VmSize"), own)


def training_bytes(student: torch.nn.Module, trainable: list[torch.nn.Parameter], image_side: int,
                   batch: int, eval_batch: int, images: int = 0, loss_step: int = 0) -> int:
    """Host bytes a run allocates once training starts, beyond what the process holds when it is checked:
    the images as one uint8 tensor (`images`: CIFAR-sized sets; image folders decode per batch), a gradient
    and a momentum per trained weight, the activations of a step (each layer's output, kept for the backward
    pass, as much again for their gradients, and half as much for the convolutions' backward workspace: 2.5x,
    measured on CIFAR students, benchmarks/RESULTS.md) and the
    largest layers of an evaluation batch (no gradients: a layer's input and output at a time), and the
    losses' own working memory of a step (`loss_step`: CRD's negatives). Activation sizes come from one forward of
    two images through `student`, measured with hooks, scaled to the batch. Nothing is counted for a GPU
    run, whose activations live on the device."""
    if next(student.parameters()).device.type != "cpu":
        return images  # the rest lives in device memory
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel() * out.element_size() // 2)
                                     if isinstance(out, torch.Tensor) else None)
             for m in student.modules() if not list(m.children())]
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            student(torch.zeros(2, 3, image_side, image_side))
    finally:
        for hook in hooks:
            hook.remove()
        student.train(was_training)
    per_sample, largest = sum(outputs), max(outputs, default=0)
    weights = sum(p.numel() * p.element_size() for p in trainable)
    step = 5 * per_sample * batch // 2 + loss_step
    return images + 2 * weights + max(step, 3 * largest * eval_batch)  # a step and an evaluation never overlap


def device_free(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def check_run_memory(needs: RunNeeds, limits: HostLimits, lighter: str) -> None:
    """Refuse, in one line, a run that would not fit; `lighter` says what would (e.g. logits only)."""
    if needs.device and needs.device_free is not None and needs.device > needs.device_free:
        raise ConfigError(f"the cache's rows take {human_bytes(needs.device)} on the GPU, which has "
                          f"{human_bytes(needs.device_free)} free: keep them in host memory with --cache-device cpu"
                          f"{', or ' + lighter if lighter else ''}")
    if needs.disk and needs.disk_free is not None and needs.disk > needs.disk_free:
        raise ConfigError(f"the local copy of the cache needs {human_bytes(needs.disk)} more at {needs.local_folder} "
                          f"but {human_bytes(needs.disk_free)} is free there: point RICHKD_CACHE_LOCAL at a larger "
                          f"disk{', or ' + lighter if lighter else ''}")
    if limits.address_space is not None:
        total = limits.vm_size + needs.mapped + needs.private
        if total > limits.address_space:
            raise ConfigError(f"the run needs {human_bytes(total)} of address space (the mapped cache "
                              f"{human_bytes(needs.mapped)}, {human_bytes(limits.vm_size)} already) but RLIMIT_AS "
                              f"(ulimit -v) allows {human_bytes(limits.address_space)}: raise it"
                              f"{', or ' + lighter if lighter else ''}")
    if limits.cgroup_max is not None:
        room = limits.cgroup_max - limits.cgroup_other
        if limits.private + needs.private > room:
            raise ConfigError(f"the run needs {human_bytes(limits.private + needs.private)} of private memory but its "
                              f"cgroup's memory.max leaves {human_bytes(max(room, 0))}"
                              f"{': ' + lighter if lighter else ''}")
    if limits.available is not None and needs.private > limits.available:
        raise ConfigError(f"the run needs {human_bytes(needs.private)} more memory but {human_bytes(limits.available)} "
                          f"is available{': ' + lighter if lighter else ''}")
