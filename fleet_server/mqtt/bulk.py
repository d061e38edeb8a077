"""Many rows into one table, inside the session's transaction, at the driver's own speed.

SQLAlchemy's executemany prepares every row on its own (and psycopg then sends one
statement per row). Telemetry arrives thousands of rows a second, so rows go to
PostgreSQL through COPY and to SQLite through the driver's executemany, after the same
conversions SQLAlchemy would apply (each column type's bind processor), so what is stored
reads back exactly as if the ORM had written it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session


def insert_rows(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) into `table`."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    columns = list(rows[0])
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in columns]
    convert = [(i, p) for i, p in enumerate(processors) if p is not None]
    values: list[tuple[Any, ...]] = []
    for row in rows:
        value = list(row.values())
        for i, processor in convert:
            value[i] = processor(value[i])
        values.append(tuple(value))
    names = ", ".join(dialect.identifier_preparer.quote(c) for c in columns)
    target = dialect.identifier_preparer.format_table(table)
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        driver = connection.connection.driver_connection
        statement = f"COPY {target} ({names}) FROM STDIN"
        with driver.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
            for value_row in values:
                copy.write_row(value_row)
    elif dialect.name == "sqlite":
        marks = ", ".join("?" * len(columns))
        connection.exec_driver_sql(f"INSERT INTO {target} ({names}) VALUES ({marks})", values)
    else:
        session.execute(insert(table), list(rows))
