"""Validated settings of one export: the source table, the state table and the tuning options."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

#: Export names become part of object keys and of the advisory lock key, so keep them plain.
EXPORT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

#: ``schema.table`` or ``table``, unquoted identifiers only.
QUALIFIED_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")

COMPRESSIONS = ("gzip", "none")


def split_qualified_name(value: str, *, what: str, default_schema: str = "public") -> tuple[str, str]:
    """Split ``schema.table`` into its parts, raising ``ValueError`` that names ``what`` on bad input."""
    if not isinstance(value, str) or not QUALIFIED_NAME_PATTERN.match(value):
        raise ValueError(
            f"Invalid {what} {value!r}: expected 'schema.table' or 'table' made of letters, digits and "
            "underscores, for example 'public.audit_partitioned'."
        )
    if "." in value:
        schema, table = value.split(".", 1)
        return schema, table
    return default_schema, value


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name} {value!r}: expected a positive integer.")
    return value


def _non_negative_delta(name: str, value: object) -> timedelta:
    delta = value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        delta = timedelta(seconds=value)
    if not isinstance(delta, timedelta) or delta < timedelta(0):
        raise ValueError(f"Invalid {name} {value!r}: expected a timedelta or a number of seconds >= 0.")
    return delta


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """Everything one export needs besides its connections and destination.

    One export is one source table and one row in the state table. Build it with
    :meth:`create`, which validates every field and raises ``ValueError`` naming
    the bad value and the expected form.
    """

    name: str
    table: str
    timestamp_column: str = "timestamp"
    id_column: str = "id"
    columns: tuple[str, ...] | None = None
    legacy_table: str | None = None
    state_table: str = "public.audit_export_state"
    floor_margin: timedelta = timedelta(seconds=60)
    fallback_window: timedelta = timedelta(days=7)
    max_backlog: timedelta = timedelta(days=1)
    max_xid_interval: int = 1_000_000
    max_rows_per_run: int = 1_000_000
    max_run_duration: timedelta = timedelta(minutes=4)
    page_rows: int = 10_000
    rows_per_object: int = 100_000
    statement_target: timedelta = timedelta(milliseconds=250)
    lock_wait: timedelta = timedelta(seconds=10)
    compression: str = "gzip"

    @classmethod
    def create(cls, **kwargs) -> ExportSettings:
        """Build validated settings; ``columns`` may be a comma-separated string or a sequence."""
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and the fix."""
        if not isinstance(self.name, str) or not EXPORT_NAME_PATTERN.match(self.name):
            raise ValueError(
                f"Invalid export name {self.name!r}: use 1-63 letters, digits, '_' or '-', starting with a "
                "letter or digit, for example 'audit'."
            )
        split_qualified_name(self.table, what="table")
        split_qualified_name(self.state_table, what="state_table")
        if self.legacy_table:
            split_qualified_name(self.legacy_table, what="legacy_table")
        for what, column in (("timestamp_column", self.timestamp_column), ("id_column", self.id_column)):
            if not isinstance(column, str) or not column:
                raise ValueError(f"Invalid {what} {column!r}: expected a column name.")
        if self.columns is not None:
            if not self.columns or not all(isinstance(c, str) and c for c in self.columns):
                raise ValueError(f"Invalid columns {self.columns!r}: expected a non-empty list of column names.")
        for name in ("max_xid_interval", "max_rows_per_run", "page_rows", "rows_per_object"):
            _positive_int(name, getattr(self, name))
        for name in (
            "floor_margin",
            "fallback_window",
            "max_backlog",
            "max_run_duration",
            "statement_target",
            "lock_wait",
        ):
            object.__setattr__(self, name, _non_negative_delta(name, getattr(self, name)))
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"Invalid compression {self.compression!r}: expected one of {', '.join(COMPRESSIONS)}."
            )
        if self.max_backlog <= timedelta(0):
            raise ValueError(f"Invalid max_backlog {self.max_backlog!r}: expected a duration above zero.")

    def __post_init__(self) -> None:
        if isinstance(self.columns, str):
            parts = tuple(c.strip() for c in self.columns.split(",") if c.strip())
            object.__setattr__(self, "columns", parts or None)
        elif self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
        if self.legacy_table == "":
            object.__setattr__(self, "legacy_table", None)
