"""The device's vital signs, read straight from procfs and sysfs.

No psutil: a device installs as little as it can, and the handful of numbers telemetry
needs are a few lines of text in /proc. The roots are parameters so tests can point them
at a fake tree. Every value is clamped into the range `HealthSample` accepts, because a
sample that cannot be encoded would cost the whole telemetry batch.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import MAX_INT, HealthSample

ABSOLUTE_ZERO_C = -273.15


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative jiffies from the first line of /proc/stat."""

    busy: int
    total: int


class HealthMonitor:
    """Samples the machine's health; `sample` may be called from any thread."""

    def __init__(
        self,
        agent_version: str,
        disk_path: Path,
        proc: Path = Path("/proc"),
        sys_thermal: Path = Path("/sys/class/thermal"),
    ) -> None:
        """Raises OSError when `proc` has no readable stat file (not Linux)."""
        if not agent_version.strip():
            raise ValueError("agent_version must not be blank")
        self.agent_version = agent_version
        self.disk_path = disk_path
        self.proc = proc
        self.sys_thermal = sys_thermal
        self._lock = threading.Lock()
        # The first sample's CPU use is measured from here, not since boot.
        self._previous = read_cpu_times(proc / "stat")

    def sample(self, now: float) -> HealthSample:
        """One HealthSample at `now`; raises OSError or ValueError if procfs is unreadable."""
        current = read_cpu_times(self.proc / "stat")
        with self._lock:
            previous, self._previous = self._previous, current
        return HealthSample(
            ts=now,
            cpu_percent=cpu_percent(previous, current),
            memory_percent=memory_percent(self.proc / "meminfo"),
            memory_rss_bytes=rss_bytes(self.proc / "self" / "status"),
            temperature_c=max_temperature_c(self.sys_thermal),
            disk_free_bytes=disk_free_bytes(self.disk_path),
            uptime_s=uptime_s(self.proc / "uptime"),
            agent_version=self.agent_version,
        )


def read_cpu_times(stat: Path) -> CpuTimes:
    """The aggregate `cpu` line: user nice system idle iowait irq softirq steal [guest ...]."""
    with stat.open() as f:
        fields = f.readline().split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        raise ValueError(f"{stat} does not start with an aggregate cpu line")
    # guest and guest_nice are already counted in user and nice, so they are left out.
    jiffies = [int(v) for v in fields[1:9]]
    idle = sum(jiffies[3:5])  # idle + iowait: the CPU had nothing to run
    total = sum(jiffies)
    return CpuTimes(busy=total - idle, total=total)


def cpu_percent(previous: CpuTimes, current: CpuTimes) -> float:
    elapsed = current.total - previous.total
    if elapsed <= 0:  # no tick yet, or counters reset (a fake tree, a container restart)
        return 0.0
    return _clamp(100.0 * (current.busy - previous.busy) / elapsed, 0.0, 100.0)


def memory_percent(meminfo: Path) -> float:
    values = _read_kib_fields(meminfo)
    total = values.get("MemTotal", 0)
    if total <= 0:
        raise ValueError(f"{meminfo} has no MemTotal")
    available = values.get("MemAvailable")
    if available is None:
        # Kernels before 3.14 lack MemAvailable; this is the estimate it replaced.
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return _clamp(100.0 * (total - available) / total, 0.0, 100.0)


def rss_bytes(status: Path) -> int:
    # Kernel threads have no VmRSS; for the agent that would mean a broken procfs, so 0.
    kib = _read_kib_fields(status).get("VmRSS", 0)
    return min(max(kib * 1024, 0), MAX_INT)


def max_temperature_c(sys_thermal: Path) -> float | None:
    """The hottest zone in °C; None without any readable, plausible sensor."""
    readings = [t for zone in sys_thermal.glob("thermal_zone*") if (t := _zone_c(zone)) is not None]
    return max(readings, default=None)


def _zone_c(zone: Path) -> float | None:
    try:
        millidegrees = int((zone / "temp").read_text().strip())
    except (OSError, ValueError):
        # Some zones refuse reads (EIO, EAGAIN) while their sensor sleeps.
        return None
    celsius = millidegrees / 1000.0
    # Drivers report errors as absurd values (e.g. -274000); they are not temperatures.
    return celsius if math.isfinite(celsius) and celsius >= ABSOLUTE_ZERO_C else None


def disk_free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer at `path`, or at its nearest existing parent."""
    # The models folder may not exist before the first install; its filesystem does.
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    st = os.statvfs(existing)
    return min(st.f_bavail * st.f_frsize, MAX_INT)


def uptime_s(uptime: Path) -> float:
    seconds = float(uptime.read_text().split()[0])
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _read_kib_fields(path: Path) -> dict[str, int]:
    """`Name:   1234 kB` lines as {Name: 1234}; other lines are skipped."""
    values: dict[str, int] = {}
    with path.open() as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name.strip()] = int(parts[0])
    return values


def _clamp(value: float, low: float, high: float) -> float:
    if math.isnan(value):
        return low
    return min(max(value, low), high)
