"""A PostgreSQL database of its own for each test run or benchmark: created empty, dropped
after."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url


def create_database(server_url: str, prefix: str, connect_timeout: int = 10) -> str:
    """A new, empty database on the PostgreSQL server behind server_url; its URL."""
    server = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": connect_timeout}
    )
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return server.set(database=name).render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    target: URL = make_url(database_url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    finally:
        admin.dispose()
