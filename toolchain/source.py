"""Recognise the source model on disk and fingerprint it, before TensorFlow is involved."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Literal

from toolchain.errors import SourceModelError

SourceFormat = Literal["keras", "h5", "saved_model"]
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def detect_format(src: Path) -> SourceFormat:
    """What kind of model `src` is, judged by its contents, not only its name."""
    if not src.exists():
        raise SourceModelError(f"{src} does not exist")
    if src.is_dir():
        if (src / "saved_model.pb").is_file() or (src / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise SourceModelError(f"{src} is a folder but not a SavedModel (no saved_model.pb in it)")
    try:
        with src.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise SourceModelError(f"cannot read {src}: {exc.strerror or exc}") from None
    if head == _HDF5_MAGIC:
        return "h5"
    if zipfile.is_zipfile(src):
        try:
            with zipfile.ZipFile(src) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceModelError(f"{src} is a damaged .keras archive: {exc}") from None
        if "config.json" in names:
            return "keras"
        raise SourceModelError(f"{src} is a zip archive but not a .keras model (no config.json)")
    raise SourceModelError(
        f"{src} is not a model: expected a .keras or .h5 file or a SavedModel folder"
    )


def source_sha256(src: Path) -> str:
    """sha256 of a model file, or of a SavedModel folder's relative paths and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    try:
        for path in files:
            if src.is_dir():
                digest.update(str(path.relative_to(src)).encode() + b"\0")
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    except OSError as exc:
        raise SourceModelError(f"cannot read {src}: {exc.strerror or exc}") from None
    return digest.hexdigest()
