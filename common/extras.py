"""One line naming the extra to install, instead of a traceback from an import, when a
program of the project runs where its extra was not installed (`pip install edgefleet`
gives `edge-convert` and `fleet-server` commands that need `[convert]` and `[server]`)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable, Iterable

DISTRIBUTION = "edgefleet"

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def missing_for(extra: str, requires: Iterable[str], installed: Callable[[str], bool]) -> list[str]:
    """The distributions that `extra` adds (as `requires` lists them in the package's
    metadata) and that are not `installed`."""
    missing = []
    for requirement in requires:
        marker = _EXTRA.search(requirement)
        name = _NAME.match(requirement)
        if marker and marker[1] == extra and name and not installed(name[0]):
            missing.append(name[0])
    return list(dict.fromkeys(missing))


def require_extra(program: str, extra: str) -> None:
    """Exit 2 with one line when `extra` is not installed. From a source tree, where the
    package's metadata is absent, the imports themselves say what is missing."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return
    missing = missing_for(extra, requires, _installed)
    if missing:
        print(
            f"{program}: error: needs the {extra!r} extra ({', '.join(missing)} not "
            f"installed): pip install '{DISTRIBUTION}[{extra}]'",
            file=sys.stderr,
        )
        sys.exit(2)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
