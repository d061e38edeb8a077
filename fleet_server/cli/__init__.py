"""`fleet-server`: the server's own commands (`main`) and the rollout client (`rollout`)."""

from fleet_server.cli.main import cli, main

__all__ = ["cli", "main"]
