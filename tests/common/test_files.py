"""Durable writes: the old content or the new, with exactly the mode asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.files import write_atomic, write_synced


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_file_is_replaced_whole_with_exactly_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("old")
    old_umask = os.umask(0o077)  # a umask must neither narrow nor widen what is asked
    try:
        write_atomic(path, b"new", mode=0o640)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.json"]


def test_what_a_power_cut_left_behind_is_reused(tmp_path: Path) -> None:
    (tmp_path / ".record.json.tmp").write_bytes(b"half a reco")
    write_atomic(tmp_path / "record.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "counters.json"
    path.write_text("kept")

    with pytest.raises(TypeError):  # a failure in the middle of the write
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counters.json"]


def test_a_link_at_the_temporary_name_is_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (tmp_path / ".agent.toml.tmp").symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):  # ELOOP
        write_atomic(tmp_path / "agent.toml", b"x")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "agent.toml").exists()


def test_a_synced_write_never_replaces_a_file(tmp_path: Path) -> None:
    write_synced(tmp_path / "model.tflite", b"\x00")
    with pytest.raises(FileExistsError):
        write_synced(tmp_path / "model.tflite", b"\x01")
    assert (tmp_path / "model.tflite").read_bytes() == b"\x00"
