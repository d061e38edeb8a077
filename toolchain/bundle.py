"""Write artifacts so that a reader sees the whole thing or nothing: temp, fsync, rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.files import fsync_dir, write_synced
from protocol.manifest import MANIFEST_FILE, SignedManifest, manifest_to_json
from toolchain.errors import OptionError


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse early, before any work, to replace an existing folder without --force."""
    if out.exists() and not force:
        raise OptionError(f"{out} already exists; choose another --out or pass --force")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out} exists and is not a folder")


def write_bundle(out: Path, model: bytes, model_file: str, signed: SignedManifest) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_synced(staging / model_file, model)
        write_synced(staging / MANIFEST_FILE, manifest_to_json(signed))
        fsync_dir(staging)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def _swap_in(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    # Directories cannot be swapped in one rename; the old one moves aside first and is
    # removed only once the new one stands in its place.
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rename(out, retired / out.name)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
