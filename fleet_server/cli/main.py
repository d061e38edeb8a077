"""`fleet-server`: every subcommand builds the same Settings, so all meet one database."""

from __future__ import annotations

import datetime as dt
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fleet_server.auth import Role
from fleet_server.cli.rollout import rollout
from fleet_server.errors import ServiceError
from fleet_server.settings import Settings
from protocol.mqtt import DEFAULT_PORT

F = TypeVar("F", bound=Callable[..., Any])
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def storage_options(command: F) -> F:
    """--data-dir and --database-url on every subcommand, also read from EDGEFLEET_*."""
    command = click.option(
        "--database-url",
        envvar="EDGEFLEET_DATABASE_URL",
        help="SQLAlchemy URL (default: SQLite in the data dir); postgresql+psycopg://…",
    )(command)
    command = click.option(
        "--data-dir",
        type=click.Path(path_type=Path),
        envvar="EDGEFLEET_DATA_DIR",
        help="Database, artifacts and broker files (default ./fleet-data).",
    )(command)
    return command


def make_settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def fails_cleanly(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ServiceError, ValueError, OSError) as exc:
            click.echo(f"fleet-server: error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def parse_duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: use a number and a unit, e.g. 30m, 24h or 7d")
    return dt.timedelta(**{_UNITS[m[2]]: int(m[1])})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgefleet", prog_name="fleet-server")
def cli() -> None:
    """The edgefleet fleet server: device registry, model registry, MQTT bridge."""


@cli.command()
@storage_options
@click.option("--mqtt-url", envvar="EDGEFLEET_MQTT_URL", help="mqtt://HOST:PORT of the broker.")
@click.option(
    "--broker-dir",
    type=click.Path(path_type=Path),
    envvar="EDGEFLEET_BROKER_DIR",
    help="Where broker-config wrote the server's credentials (default DATA_DIR/broker).",
)
@click.option("--host", envvar="EDGEFLEET_HOST", help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, envvar="EDGEFLEET_PORT", help="Listen port (default 8080).")
@click.option("--public-url", envvar="EDGEFLEET_PUBLIC_URL", help="URL devices use to reach us.")
@fails_cleanly
def serve(**options: Any) -> None:
    """Run the HTTP API and the MQTT bridge (migrating the database first)."""
    import uvicorn

    from fleet_server.app import create_app

    settings = make_settings(**options)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@storage_options
@fails_cleanly
def db_upgrade(**options: Any) -> None:
    """Apply every Alembic migration not applied yet."""
    from fleet_server.migrate import upgrade

    settings = make_settings(**options)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())
    click.echo("database is at the latest schema")


@cli.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@storage_options
@click.option("--role", type=click.Choice([r.name for r in Role]), required=True)
@click.option("--name", default=None, help="Who the token is for (default: the role).")
@fails_cleanly
def token_create(role: str, name: str | None, **options: Any) -> None:
    """Print a new API token; only its hash is stored."""
    from fleet_server.app import build_state
    from fleet_server.db import transaction
    from fleet_server.services.tokens import create_api_token

    state = build_state(make_settings(**options), with_mqtt=False)
    with transaction(state.sessions) as session:
        secret = create_api_token(session, Role[role], name or role, actor="cli")
    click.echo(secret)


@token.command("list")
@storage_options
@fails_cleanly
def token_list(**options: Any) -> None:
    """Every API token: id, role, name, when made and, if so, when revoked."""
    from fleet_server.app import build_state
    from fleet_server.services.tokens import list_api_tokens

    state = build_state(make_settings(**options), with_mqtt=False)
    with state.sessions() as session:
        for row in list_api_tokens(session):
            revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            click.echo(
                f"{row.id:>5}  {row.role:<8} {row.name:<24} "
                f"created {row.created_at:%Y-%m-%d %H:%M}  {revoked}"
            )


@token.command("revoke")
@storage_options
@click.argument("token_id", type=int)
@fails_cleanly
def token_revoke(token_id: int, **options: Any) -> None:
    """Revoke the token with this id (see `token list`): the API and the console refuse
    it from the next request on."""
    from fleet_server.app import build_state
    from fleet_server.db import transaction
    from fleet_server.services.tokens import revoke_api_token

    state = build_state(make_settings(**options), with_mqtt=False)
    with transaction(state.sessions) as session:
        row = revoke_api_token(session, token_id, actor="cli")
        name, role = row.name, row.role
    click.echo(f"revoked token {token_id} ({role} {name})")


@cli.group()
def enrollment() -> None:
    """Enrolment tokens for new devices."""


@enrollment.command("create")
@storage_options
@click.option("--tags", default="", help="Comma-separated tags every enrolled device gets.")
@click.option("--uses", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--expires", default=None, help="Lifetime such as 30m, 24h or 7d (default: none).")
@fails_cleanly
def enrollment_create(tags: str, uses: int, expires: str | None, **options: Any) -> None:
    """Print a new enrolment token."""
    from fleet_server.app import build_state
    from fleet_server.db import transaction
    from fleet_server.services.devices import check_tags
    from fleet_server.services.tokens import create_enrollment_token

    tag_list = check_tags([t.strip() for t in tags.split(",") if t.strip()])
    lifetime = parse_duration(expires) if expires else None
    state = build_state(make_settings(**options), with_mqtt=False)
    with transaction(state.sessions) as session:
        secret = create_enrollment_token(
            session, tags=tag_list, uses=uses, expires_in=lifetime, actor="cli"
        )
    click.echo(secret)


@cli.command("broker-config")
@storage_options
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for mosquitto.conf and its files (default DATA_DIR/broker).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listener address.")
@click.option("--force", is_flag=True, help="Replace an existing configuration.")
@fails_cleanly
def broker_config(out: Path | None, port: int, host: str, force: bool, **options: Any) -> None:
    """Write the Mosquitto configuration (dynamic security) that the server expects."""
    from fleet_server.mqtt.broker_config import CONFIG_FILE, write_broker_config

    settings = make_settings(**options)
    folder = out or settings.resolved_broker_dir()
    credentials = write_broker_config(folder, port=port, host=host, force=force)
    click.echo(f"wrote {folder / CONFIG_FILE} (server user {credentials.username!r})")
    click.echo(f"start the broker with: mosquitto -c {folder / CONFIG_FILE}")


cli.add_command(rollout)


def main() -> None:
    cli(prog_name="fleet-server")
