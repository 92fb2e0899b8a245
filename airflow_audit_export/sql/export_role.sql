-- Least-privilege role for airflow-audit-export.
--
-- Run once per source database as its owner or a superuser, for example:
--   psql "postgresql://admin@db.internal/app" -f airflow_audit_export/sql/export_role.sql
-- then set the role's password (\password audit_exporter) and use it in
-- AIRFLOW_CONN_AUDIT_DB. Edit the table names if yours differ from the
-- reference schema. The script is idempotent.
--
-- What the export needs, and nothing more:
--   * SELECT on the source tables (the partitioned table grants its partitions);
--   * SELECT, INSERT, UPDATE on its state table, created here so the role
--     needs no CREATE privilege;
--   * pg_read_all_stats, so the timestamp floor can see every session's
--     xact_start (without it the export still loses nothing, but scans back
--     fallback_window, 7 days by default, on every run).
-- Advisory locks, pg_current_snapshot(), pg_prepared_xacts and
-- pg_control_system() need no grant.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'audit_exporter') THEN
        CREATE ROLE audit_exporter LOGIN;
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO audit_exporter', current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO audit_exporter;
GRANT SELECT ON public.audit_partitioned TO audit_exporter;
GRANT SELECT ON public.audit TO audit_exporter;
GRANT pg_read_all_stats TO audit_exporter;

-- The same definition the exporter uses when it creates the table itself.
CREATE TABLE IF NOT EXISTS public.audit_export_state (
    export_name text PRIMARY KEY,
    source_table text NOT NULL,
    cursor_xid bigint NOT NULL,
    cursor_floor timestamptz NOT NULL,
    cursor_floor_trusted boolean NOT NULL,
    floor_untrusted_reason text,
    exported_through timestamptz NOT NULL,
    anchored_at timestamptz NOT NULL,
    system_identifier text,
    last_seen_xid bigint NOT NULL,
    key_epoch integer NOT NULL DEFAULT 0,
    lineage_token text,
    previous_lineage_token text,
    floor_history jsonb NOT NULL DEFAULT '[]',
    pending jsonb,
    gaps jsonb NOT NULL DEFAULT '[]',
    last_run jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Columns added after the first release; a table created by an older version gets them here.
ALTER TABLE public.audit_export_state
    ADD COLUMN IF NOT EXISTS lineage_token text,
    ADD COLUMN IF NOT EXISTS previous_lineage_token text;
GRANT SELECT, INSERT, UPDATE ON public.audit_export_state TO audit_exporter;
