"""Airflow operators of the audit export provider."""

from airflow_audit_export.operators.anchor import AnchorOperator
from airflow_audit_export.operators.backfill import (
    BackfillRangeOperator,
    BackfillSummaryOperator,
    BackfillWindowOperator,
)
from airflow_audit_export.operators.xmin_export import XminExportOperator

__all__ = [
    "AnchorOperator",
    "BackfillRangeOperator",
    "BackfillSummaryOperator",
    "BackfillWindowOperator",
    "XminExportOperator",
]
