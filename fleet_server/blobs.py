"""Artifacts on disk, addressed by sha256: written once, atomically, never changed."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from fleet_server.errors import TooLarge

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, source: BinaryIO, expected_sha256: str, max_bytes: int | None = None) -> int:
        """Copy `source` in; refuses (ValueError) if its digest is not the expected one,
        and (TooLarge) a stream longer than max_bytes, whatever its headers claimed."""
        target = self.path(expected_sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while block := source.read(1 << 20):
                    digest.update(block)
                    size += len(block)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"upload is over the limit of {max_bytes} bytes")
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected_sha256:
                raise ValueError("digest mismatch")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size
