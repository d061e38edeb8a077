"""Two model slots and a `current` link between them, changed only by atomic renames.

`models/a/` and `models/b/` each hold a bundle (the model file and its manifest.json);
`models/current` is a symlink to one of them. A new model is installed into the slot
`current` does not point to, under a temporary name renamed into place, so a power cut
leaves either the old slot or the new one, never half of one; switching is one
`os.replace` of the link. The slot the link left keeps the previous model for a rollback.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.files import fsync_dir, fsync_file

SLOT_NAMES = ("a", "b")
CURRENT = "current"
MANIFEST = "manifest.json"


class Slots:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def current_name(self) -> str | None:
        """ "a" or "b", or None when no model is installed as current."""
        link = self.root / CURRENT
        try:
            target = os.readlink(link)
        except OSError:
            return None
        name = Path(target).name
        return name if name in SLOT_NAMES and (self.root / name).is_dir() else None

    def path(self, name: str) -> Path:
        if name not in SLOT_NAMES:
            raise ValueError(f"unknown slot {name!r}")
        return self.root / name

    def inactive_name(self) -> str:
        current = self.current_name()
        return "b" if current == "a" else "a"

    def install(self, name: str, model_file: Path, model_name: str, manifest_json: bytes) -> Path:
        """Put a bundle into slot `name` (never the current one), replacing what was there."""
        if name == self.current_name():
            raise ValueError(f"slot {name} is serving: install into the other one")
        staging = self.root / f".{name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copyfile(model_file, staging / model_name)
        (staging / MANIFEST).write_bytes(manifest_json)
        for item in staging.iterdir():
            fsync_file(item)
        fsync_dir(staging)
        final = self.path(name)
        if final.exists():
            # Renamed aside first: a directory cannot be replaced by rename while it has files.
            old = self.root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(final)
        fsync_dir(self.root)
        return final

    def point_current(self, name: str | None) -> None:
        """Make `current` point at slot `name` (None: at nothing), atomically."""
        link = self.root / CURRENT
        if name is None:
            link.unlink(missing_ok=True)
        else:
            self.path(name)  # checks the name
            staging = self.root / f".{CURRENT}.new"
            staging.unlink(missing_ok=True)
            staging.symlink_to(name)
            os.replace(staging, link)
        fsync_dir(self.root)

    def discard_leftovers(self) -> None:
        """What a power cut mid-install left behind is garbage: the slot it was for was
        never pointed at. Only the agent calls this, at start, before any install."""
        for item in self.root.glob(".*"):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
