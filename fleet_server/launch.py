"""`fleet-server`'s entry point: says which extra to install before importing FastAPI."""

from __future__ import annotations

from common.extras import require_extra


def main() -> None:
    require_extra("fleet-server", "server")
    from fleet_server.cli import main as cli

    cli()
