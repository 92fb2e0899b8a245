"""The shipped least-privilege script: the state table it creates and the grants it gives."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from airflow_audit_export.state import StateStore
from airflow_audit_export.testing.schema import EXPORT_ROLE

COLUMNS_QUERY = """
SELECT column_name, data_type, is_nullable, column_default
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = %s
ORDER BY ordinal_position
"""


def test_script_state_table_matches_exporter(pg_cluster, connect):
    scratch = f"t_{uuid.uuid4().hex[:12]}"
    pg_cluster.create_database(scratch)
    with pg_cluster.connect(scratch) as conn:
        created = StateStore(conn, "public.audit_export_state").ensure_table()
        from_exporter = conn.execute(COLUMNS_QUERY, ("audit_export_state",)).fetchall()
    with pg_cluster.connect() as admin:
        admin.execute(f'DROP DATABASE "{scratch}"')

    from_script = connect().execute(COLUMNS_QUERY, ("audit_export_state",)).fetchall()

    assert created is True
    assert from_script == from_exporter


def test_export_role_privileges_are_minimal(connect):
    admin = connect()

    def check(query: str, *args) -> bool:
        return admin.execute(query, args).fetchone()[0]

    assert check("SELECT rolsuper FROM pg_roles WHERE rolname = %s", EXPORT_ROLE) is False
    assert check("SELECT has_table_privilege(%s, 'public.audit_partitioned', 'SELECT')", EXPORT_ROLE)
    assert check("SELECT has_table_privilege(%s, 'public.audit', 'SELECT')", EXPORT_ROLE)
    assert not check("SELECT has_table_privilege(%s, 'public.audit_partitioned', 'INSERT')", EXPORT_ROLE)
    assert not check("SELECT has_table_privilege(%s, 'public.audit', 'DELETE')", EXPORT_ROLE)
    assert not check("SELECT has_schema_privilege(%s, 'public', 'CREATE')", EXPORT_ROLE)
    assert check("SELECT has_table_privilege(%s, 'public.audit_export_state', 'UPDATE')", EXPORT_ROLE)
    assert not check("SELECT has_table_privilege(%s, 'public.audit_export_state', 'DELETE')", EXPORT_ROLE)
    assert check("SELECT pg_has_role(%s, 'pg_read_all_stats', 'USAGE')", EXPORT_ROLE)


def test_export_role_cannot_write_audit_rows(connect):
    exporter = connect(EXPORT_ROLE)

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        exporter.execute(
            "INSERT INTO public.audit_partitioned (workspace_id, username, operation, action_kind) "
            "VALUES ('w', 'u', 'op', 'create')"
        )
