"""HealthMonitor against fake procfs/sysfs trees, and once against this machine's own."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from edge_agent.health import HealthMonitor
from protocol.messages import HealthSample

MEMINFO = """\
MemTotal:        1000000 kB
MemFree:          100000 kB
MemAvailable:     250000 kB
Buffers:           10000 kB
Cached:           200000 kB
"""
STATUS = """\
Name:\tpython
VmPeak:\t  900000 kB
VmRSS:\t   51200 kB
Threads:\t4
"""


def stat_line(user: int, nice: int, system: int, idle: int, iowait: int = 0) -> str:
    # irq softirq steal are 0; guest and guest_nice are already in user and nice, so a
    # large guest value must not count twice.
    return f"cpu  {user} {nice} {system} {idle} {iowait} 0 0 0 999999 999999\ncpu0 1 2 3 4\n"


def fake_tree(root: Path, *, temps: dict[str, str] | None = None) -> tuple[Path, Path]:
    proc, thermal = root / "proc", root / "thermal"
    (proc / "self").mkdir(parents=True)
    thermal.mkdir()
    (proc / "stat").write_text(stat_line(100, 0, 100, 800))
    (proc / "meminfo").write_text(MEMINFO)
    (proc / "self" / "status").write_text(STATUS)
    (proc / "uptime").write_text("12345.67 40000.00\n")
    for zone, value in (temps or {}).items():
        (thermal / zone).mkdir()
        (thermal / zone / "temp").write_text(value)
    return proc, thermal


def monitor(tmp_path: Path, **temps: str) -> tuple[HealthMonitor, Path]:
    proc, thermal = fake_tree(tmp_path, temps=temps)
    return HealthMonitor("0.1.0", tmp_path, proc=proc, sys_thermal=thermal), proc


def test_sample_reads_every_value_from_the_tree(tmp_path: Path) -> None:
    health, proc = monitor(tmp_path, thermal_zone0="45500\n", thermal_zone1="61250\n")
    # 400 jiffies pass, 100 of them idle or waiting: 75 % busy.
    (proc / "stat").write_text(stat_line(300, 50, 150, 850, iowait=50))

    sample = health.sample(1_790_000_000.0)

    assert sample.ts == 1_790_000_000.0
    assert sample.cpu_percent == pytest.approx(75.0)
    assert sample.memory_percent == pytest.approx(75.0)  # 250000 of 1000000 kB available
    assert sample.memory_rss_bytes == 51200 * 1024
    assert sample.temperature_c == pytest.approx(61.25)  # the hottest zone
    assert sample.uptime_s == pytest.approx(12345.67)
    assert sample.agent_version == "0.1.0"
    st = os.statvfs(tmp_path)
    assert abs(sample.disk_free_bytes - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024


def test_cpu_is_measured_since_the_previous_sample(tmp_path: Path) -> None:
    health, proc = monitor(tmp_path)
    (proc / "stat").write_text(stat_line(200, 0, 100, 900))  # +100 busy, +100 idle
    assert health.sample(1.0).cpu_percent == pytest.approx(50.0)
    (proc / "stat").write_text(stat_line(210, 0, 100, 990))  # +10 busy, +90 idle
    assert health.sample(2.0).cpu_percent == pytest.approx(10.0)
    # No tick since the last sample: nothing to divide by.
    assert health.sample(3.0).cpu_percent == 0.0


def test_values_are_clamped_into_the_contract(tmp_path: Path) -> None:
    health, proc = monitor(tmp_path)
    # Counters that went backwards (a reset) and more memory available than installed.
    (proc / "stat").write_text(stat_line(10, 0, 10, 10))
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 5000 kB\n")
    (proc / "uptime").write_text("-3.0 0.0\n")
    (proc / "self" / "status").write_text("Name:\tkthreadd\n")

    sample = health.sample(5.0)

    assert sample.cpu_percent == 0.0
    assert sample.memory_percent == 0.0
    assert sample.uptime_s == 0.0
    assert sample.memory_rss_bytes == 0


def test_busy_share_above_100_is_clamped(tmp_path: Path) -> None:
    health, proc = monitor(tmp_path)
    # Busy grew by more than total: only a broken or racing reader sees this.
    (proc / "stat").write_text(stat_line(400, 0, 100, 710))
    assert health.sample(1.0).cpu_percent == 100.0


def test_memory_without_memavailable_uses_the_old_estimate(tmp_path: Path) -> None:
    health, proc = monitor(tmp_path)
    (proc / "meminfo").write_text(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n"
    )
    assert health.sample(1.0).memory_percent == pytest.approx(60.0)


def test_temperature_is_none_without_sensors(tmp_path: Path) -> None:
    health, _ = monitor(tmp_path)
    assert health.sample(1.0).temperature_c is None


def test_temperature_skips_unreadable_and_absurd_zones(tmp_path: Path) -> None:
    health, _ = monitor(
        tmp_path,
        thermal_zone0="garbage\n",
        thermal_zone1="-274000\n",  # a driver's error code, below absolute zero
        thermal_zone2="38000\n",
    )
    (tmp_path / "thermal" / "thermal_zone3").mkdir()  # a zone without a temp file
    assert health.sample(1.0).temperature_c == pytest.approx(38.0)


def test_temperature_is_none_when_every_zone_is_unreadable(tmp_path: Path) -> None:
    health, _ = monitor(tmp_path, thermal_zone0="\n")
    assert health.sample(1.0).temperature_c is None


def test_missing_thermal_root_means_no_sensor(tmp_path: Path) -> None:
    proc, _ = fake_tree(tmp_path)
    health = HealthMonitor("0.1.0", tmp_path, proc=proc, sys_thermal=tmp_path / "nowhere")
    assert health.sample(1.0).temperature_c is None


def test_disk_path_not_created_yet_reports_its_filesystem(tmp_path: Path) -> None:
    proc, thermal = fake_tree(tmp_path)
    health = HealthMonitor("0.1.0", tmp_path / "models" / "not-yet", proc=proc, sys_thermal=thermal)
    assert health.sample(1.0).disk_free_bytes > 0


def test_blank_agent_version_is_refused(tmp_path: Path) -> None:
    proc, thermal = fake_tree(tmp_path)
    with pytest.raises(ValueError, match="agent_version"):
        HealthMonitor("  ", tmp_path, proc=proc, sys_thermal=thermal)


def test_a_tree_without_proc_stat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HealthMonitor("0.1.0", tmp_path, proc=tmp_path / "no-proc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads this machine's /proc")
def test_real_proc_gives_plausible_values(tmp_path: Path) -> None:
    health = HealthMonitor("0.1.0", tmp_path)
    # Burn a little CPU so the window has ticks in it; the value is only range-checked.
    deadline = time.perf_counter() + 0.05
    while time.perf_counter() < deadline:
        pass
    sample = health.sample(time.time())

    assert isinstance(sample, HealthSample)  # built, so its invariants held
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0.0 < sample.memory_percent < 100.0
    # This pytest process has numpy loaded: tens of MB resident, well under a terabyte.
    assert 10 * 2**20 < sample.memory_rss_bytes < 2**40
    assert sample.temperature_c is None or -40.0 < sample.temperature_c < 150.0
    assert sample.disk_free_bytes > 0
    assert sample.uptime_s > 0.0
