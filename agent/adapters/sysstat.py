"""System readings for telemetry: CPU, resident memory, free memory and disk, temperature.

On Linux these come straight from ``/proc`` and ``/sys`` (a few small reads per telemetry
window); elsewhere from psutil, imported on first use. psutil costs about 1.1 MiB of resident
memory once imported, a tenth of the agent's footprint budget, for readings Linux hands out as
text. The figures match psutil's on Linux: ``cpu_percent`` counts busy time as total minus idle
and iowait (guest time is already inside user time), ``memory_available`` is ``MemAvailable``,
temperatures are the hwmon sensors, else the thermal zones.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SystemProbe", "disk_free_bytes", "release_free_heap", "rss_bytes", "temperature_c"]

_LINUX = sys.platform.startswith("linux") and Path("/proc/self/statm").exists()
_PAGE = os.sysconf("SC_PAGE_SIZE") if _LINUX else 4096


def _psutil() -> Any:
    import psutil

    return psutil


def rss_bytes() -> int:
    """This process's resident set size."""
    if _LINUX:
        return int(Path("/proc/self/statm").read_bytes().split()[1]) * _PAGE
    return int(_psutil().Process().memory_info().rss)


def disk_free_bytes(path: str) -> int:
    """Bytes free for an unprivileged user on the file system holding ``path`` (0 if unreadable)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _proc_stat_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, as psutil counts them."""
    with Path("/proc/stat").open("rb") as f:
        fields = [float(v) for v in f.readline().split()[1:9]]  # user .. steal; guest is in user
    total = sum(fields)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return total - idle, total


def _thread_sched() -> dict[int, tuple[int, int]] | None:
    """Per thread of this process: (ns run on a CPU, ns waited on a run queue), or ``None``."""
    if not _LINUX:
        return None
    out: dict[int, tuple[int, int]] = {}
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            run, wait = (task / "schedstat").read_bytes().split()[:2]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile, or the kernel has no schedstat
        out[int(task.name)] = (int(run), int(wait))
    return out or None


def temperature_c() -> float | None:
    """The hottest temperature sensor on this platform (Linux, FreeBSD), or ``None``."""
    if _LINUX:
        values = _read_millidegrees(Path("/sys/class/hwmon").glob("hwmon*/temp*_input"))
        if not values:
            values = _read_millidegrees(Path("/sys/class/thermal").glob("thermal_zone*/temp"))
        return round(max(values) / 1000.0, 1) if values else None
    read = getattr(_psutil(), "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    found = [t.current for entries in sensors.values() for t in entries if t.current is not None]
    return round(float(max(found)), 1) if found else None


def _read_millidegrees(paths: Iterable[Path]) -> list[float]:
    values = []
    for path in paths:
        try:
            values.append(float(path.read_bytes().strip()))
        except (OSError, ValueError):  # sensors that are absent or asleep refuse a read
            continue
    return values


class SystemProbe:
    """CPU use since the previous reading (like psutil's ``cpu_percent(None)``): the first
    reading counts from when the probe was made."""

    def __init__(self) -> None:
        self._sched_last = _thread_sched() or {}
        if _LINUX:
            self._proc_last = self._proc_cpu()
            self._sys_last = _proc_stat_cpu()
        else:
            psutil = _psutil()
            self._process = psutil.Process(os.getpid())
            self._process.cpu_percent(None)
            psutil.cpu_percent(None)

    @staticmethod
    def _proc_cpu() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def process_cpu_percent(self) -> float:
        """This process's CPU time over wall time since the last call, in % of one CPU."""
        if not _LINUX:
            return float(self._process.cpu_percent(None))
        (cpu0, t0), (cpu1, t1) = self._proc_last, self._proc_cpu()
        self._proc_last = (cpu1, t1)
        return round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1) if t1 > t0 else 0.0

    def system_cpu_percent(self) -> float:
        """Busy share of all CPUs since the last call, in %."""
        if not _LINUX:
            return float(_psutil().cpu_percent(None))
        (busy0, total0), (busy1, total1) = self._sys_last, _proc_stat_cpu()
        self._sys_last = (busy1, total1)
        if total1 <= total0:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * (busy1 - busy0) / (total1 - total0))), 1)

    def cpu_wait_share(self) -> float | None:
        """Of the time this process's threads wanted a CPU since the last call, the share they
        spent waiting for one (Linux ``/proc/self/task/*/schedstat``: time run and time waited on
        a run queue, in ns). Measured on a 2-core machine: about 0 idle, ~0.2 with three agents
        under load, ~0.65 with a busy loop per core besides; past 0.4 other work holds the CPU
        and any timing we make measures that work, not our models. ``None`` where the kernel does
        not say (no schedstat, not Linux)."""
        now = _thread_sched()
        if now is None:
            return None
        last, self._sched_last = self._sched_last, now
        ran = waited = 0
        for tid, (run, wait) in now.items():
            run0, wait0 = last.get(tid, (0, 0))
            ran, waited = ran + max(0, run - run0), waited + max(0, wait - wait0)
        return round(waited / (ran + waited), 4) if ran + waited > 0 else 0.0

    def memory_available_bytes(self) -> int:
        if _LINUX:
            with Path("/proc/meminfo").open("rb") as f:
                for line in f:
                    if line.startswith(b"MemAvailable:"):
                        return int(line.split()[1]) * 1024
        return int(_psutil().virtual_memory().available)


def release_free_heap() -> bool:
    """Hand memory that the C heap has freed back to the kernel (glibc ``malloc_trim``).

    glibc keeps freed heap pages mapped for reuse; importing the agent and loading models free
    about 2 MiB that would otherwise stay in the service's resident set for good. The agent
    calls this once it serves and after each telemetry window (about 1 ms). ``False`` where the
    C library is not glibc (musl, macOS): nothing to do there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc is among them
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
