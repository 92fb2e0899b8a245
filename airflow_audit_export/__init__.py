"""Airflow provider that exports a PostgreSQL audit table to object storage."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Return the provider metadata that ``airflow providers list`` shows."""
    return {
        "package-name": "airflow-audit-export",
        "name": "Audit Export",
        "description": "Exports a PostgreSQL audit table to object storage without losing a row.",
        "versions": [__version__],
        "operators": [
            {
                "integration-name": "Audit Export",
                "python-modules": [
                    "airflow_audit_export.operators.anchor",
                    "airflow_audit_export.operators.xmin_export",
                    "airflow_audit_export.operators.backfill",
                ],
            }
        ],
    }
