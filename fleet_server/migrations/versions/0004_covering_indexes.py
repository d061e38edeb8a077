"""telemetry indexes that cover what the console and /metrics aggregate

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 08:30:00.000000

Same names, more columns: every query that used the old (device_id, ts) and (ts) indexes
still can, and the pages that aggregate telemetry read the index alone. On a large
database the upgrade rebuilds these indexes, which takes a while (about a minute per
10 million rows per table on a small machine).
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# table -> index name -> (columns before, columns after)
CHANGES: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "health_samples": {
        "ix_health_samples_device_ts": (
            ["device_id", "ts"],
            [
                "device_id",
                "ts",
                "cpu_percent",
                "memory_percent",
                "temperature_c",
                "disk_free_bytes",
            ],
        ),
    },
    "inference_windows": {
        "ix_inference_windows_ts": (
            ["ts"],
            [
                *("ts", "model_name", "model_version", "device_id", "count", "errors"),
                *("nan_outputs", "latency_p50_ms", "latency_p95_ms", "mean_confidence"),
            ],
        ),
        "ix_inference_windows_device_ts": (
            ["device_id", "ts"],
            ["device_id", "ts", "latency_p50_ms", "latency_p95_ms", "count", "drift_score"],
        ),
    },
    "accuracy_windows": {
        "ix_accuracy_windows_ts": (
            ["ts"],
            ["ts", "model_name", "model_version", "labelled", "correct"],
        ),
        "ix_accuracy_windows_device_ts": (
            ["device_id", "ts"],
            ["device_id", "ts", "labelled", "correct"],
        ),
    },
}


def _swap(after: bool) -> None:
    for table, indexes in CHANGES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, (before, covering) in indexes.items():
                batch_op.drop_index(name)
                batch_op.create_index(name, covering if after else before, unique=False)


def upgrade() -> None:
    _swap(after=True)


def downgrade() -> None:
    _swap(after=False)
