"""Settings of the bundled DAGs, read from environment variables so one DAG file serves every deployment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_SCHEDULE = "*/5 * * * *"

#: Schedule presets that Airflow turns into a timetable without a cron expression.
NON_CRON_PRESETS = ("@once", "@continuous")


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
        """Read and validate the variables, so a bad value fails the DAG file's import, before any task runs.

        Raises ``ValueError`` that names the variable, its value and the expected form.
        """
        env = os.environ if environ is None else environ
        settings = cls(
            name=env.get("AUDIT_EXPORT_NAME", "audit"),
            postgres_conn_id=env.get("AUDIT_EXPORT_POSTGRES_CONN_ID", "audit_db"),
            table=env.get("AUDIT_EXPORT_TABLE", "public.audit_partitioned"),
            timestamp_column=env.get("AUDIT_EXPORT_TIMESTAMP_COLUMN", "timestamp"),
            id_column=env.get("AUDIT_EXPORT_ID_COLUMN", "id"),
            legacy_table=env.get("AUDIT_EXPORT_LEGACY_TABLE") or None,
            state_table=env.get("AUDIT_EXPORT_STATE_TABLE", "public.audit_export_state"),
            destination=_destination(env),
            aws_conn_id=env.get("AUDIT_EXPORT_AWS_CONN_ID", "aws_default"),
            schedule=_schedule(env),
            gap_policy=_gap_policy(env),
            backfill_max_active_ranges=_positive_int(env, "AUDIT_BACKFILL_MAX_ACTIVE_RANGES", 4),
            max_backlog_seconds=_positive_int(env, "AUDIT_EXPORT_MAX_BACKLOG_SECONDS", None),
        )
        settings._validate_names()
        return settings

    def _validate_names(self) -> None:
        """Check the names with the rules of :class:`ExportSettings`, naming the variable that sets each one."""
        from airflow_audit_export.settings import ExportSettings, split_qualified_name

        for variable, value in (
            ("AUDIT_EXPORT_POSTGRES_CONN_ID", self.postgres_conn_id),
            ("AUDIT_EXPORT_TIMESTAMP_COLUMN", self.timestamp_column),
            ("AUDIT_EXPORT_ID_COLUMN", self.id_column),
        ):
            if not value.strip():
                raise ValueError(f"Invalid {variable} {value!r}: expected a name. Unset it to use the default.")
        try:
            ExportSettings(name=self.name, table="public.audit_partitioned").validate()
        except ValueError as err:
            raise ValueError(f"AUDIT_EXPORT_NAME: {err}") from err
        for variable, value, what in (
            ("AUDIT_EXPORT_TABLE", self.table, "table"),
            ("AUDIT_EXPORT_LEGACY_TABLE", self.legacy_table, "legacy_table"),
            ("AUDIT_EXPORT_STATE_TABLE", self.state_table, "state_table"),
        ):
            if value is None:
                continue
            try:
                split_qualified_name(value, what=what)
            except ValueError as err:
                raise ValueError(f"{variable}: {err}") from err

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


def _schedule(env: Mapping[str, str]) -> str | None:
    """Read ``AUDIT_EXPORT_SCHEDULE`` and check a cron expression as Airflow's timetable does."""
    raw = env.get("AUDIT_EXPORT_SCHEDULE", DEFAULT_SCHEDULE)
    schedule = raw.strip()
    if schedule.lower() in ("", "none"):
        return None
    if schedule in NON_CRON_PRESETS:
        return schedule
    from airflow.sdk import CronTriggerTimetable
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    try:
        CronTriggerTimetable(schedule, timezone="UTC").validate()
    except AirflowTimetableInvalid as err:
        raise ValueError(
            f"Invalid AUDIT_EXPORT_SCHEDULE {raw!r}: {str(err).rstrip('.')}. Use a cron expression such as "
            "'*/5 * * * *', a preset such as '@hourly', or 'none' for manual runs only."
        ) from err
    return schedule


def _gap_policy(env: Mapping[str, str]) -> str:
    from airflow_audit_export.gaps import GAP_POLICIES

    raw = env.get("AUDIT_EXPORT_GAP_POLICY", "backfill")
    policy = raw.strip().lower()
    if policy not in GAP_POLICIES:
        raise ValueError(f"Invalid AUDIT_EXPORT_GAP_POLICY {raw!r}: expected one of {', '.join(GAP_POLICIES)}.")
    return policy


def _destination(env: Mapping[str, str]) -> str:
    """Read ``AUDIT_EXPORT_DESTINATION`` and reject an invalid URI when the DAG file is parsed."""
    from airflow_audit_export.writing import DestinationError, parse_destination

    value = env.get("AUDIT_EXPORT_DESTINATION") or default_destination(env)
    try:
        parse_destination(value)
    except DestinationError as err:
        raise ValueError(f"AUDIT_EXPORT_DESTINATION: {err}") from err
    return value
