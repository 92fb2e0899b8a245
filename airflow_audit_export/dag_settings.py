"""Settings of the bundled DAGs, read from environment variables so one DAG file serves every deployment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_SCHEDULE = "*/5 * * * *"


def default_destination(environ: Mapping[str, str] | None = None) -> str:
    """Return the embedded default destination, a folder under ``AIRFLOW_HOME``."""
    env = os.environ if environ is None else environ
    home = Path(env.get("AIRFLOW_HOME", Path.home() / "airflow")).expanduser().resolve()
    return f"file://{home / 'audit-export'}"


@dataclasses.dataclass(frozen=True)
class DagSettings:
    """The ``AUDIT_EXPORT_*`` environment variables, with their defaults."""

    name: str
    postgres_conn_id: str
    table: str
    timestamp_column: str
    id_column: str
    legacy_table: str | None
    state_table: str
    destination: str
    aws_conn_id: str
    schedule: str | None
    gap_policy: str
    backfill_max_active_ranges: int
    max_backlog_seconds: int | None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> DagSettings:
        env = os.environ if environ is None else environ
        schedule = env.get("AUDIT_EXPORT_SCHEDULE", DEFAULT_SCHEDULE).strip()
        return cls(
            name=env.get("AUDIT_EXPORT_NAME", "audit"),
            postgres_conn_id=env.get("AUDIT_EXPORT_POSTGRES_CONN_ID", "audit_db"),
            table=env.get("AUDIT_EXPORT_TABLE", "public.audit_partitioned"),
            timestamp_column=env.get("AUDIT_EXPORT_TIMESTAMP_COLUMN", "timestamp"),
            id_column=env.get("AUDIT_EXPORT_ID_COLUMN", "id"),
            legacy_table=env.get("AUDIT_EXPORT_LEGACY_TABLE") or None,
            state_table=env.get("AUDIT_EXPORT_STATE_TABLE", "public.audit_export_state"),
            destination=_destination(env),
            aws_conn_id=env.get("AUDIT_EXPORT_AWS_CONN_ID", "aws_default"),
            schedule=None if schedule.lower() in ("", "none") else schedule,
            gap_policy=env.get("AUDIT_EXPORT_GAP_POLICY", "backfill").strip().lower(),
            backfill_max_active_ranges=_positive_int(env, "AUDIT_BACKFILL_MAX_ACTIVE_RANGES", 4),
            max_backlog_seconds=_positive_int(env, "AUDIT_EXPORT_MAX_BACKLOG_SECONDS", None),
        )

    def anchor_tuning(self) -> dict:
        """Tuning options of the anchor task that the environment overrides."""
        return {} if self.max_backlog_seconds is None else {"max_backlog": self.max_backlog_seconds}

    def source_arguments(self) -> dict:
        """Operator arguments that name the source, the destination and the connections."""
        return {
            "export_name": self.name,
            "table": self.table,
            "destination": self.destination,
            "postgres_conn_id": self.postgres_conn_id,
            "aws_conn_id": self.aws_conn_id,
            "timestamp_column": self.timestamp_column,
            "id_column": self.id_column,
            "state_table": self.state_table,
        }


def _positive_int(env, name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"Invalid {name} {raw!r}: expected a positive integer.")
    return int(raw)


def _destination(env: Mapping[str, str]) -> str:
    """Read ``AUDIT_EXPORT_DESTINATION`` and reject an invalid URI when the DAG file is parsed."""
    from airflow_audit_export.writing import DestinationError, parse_destination

    value = env.get("AUDIT_EXPORT_DESTINATION") or default_destination(env)
    try:
        parse_destination(value)
    except DestinationError as err:
        raise ValueError(f"AUDIT_EXPORT_DESTINATION: {err}") from err
    return value
