"""Readers of exported objects for tests and demos: keys, bytes and decoded rows."""

from __future__ import annotations

import gzip
import json

from airflow_audit_export.writing import LocalDestination


def read_local_objects(destination: LocalDestination) -> dict[str, bytes]:
    """Return every published object under a local destination, keyed by its relative key."""
    objects = {}
    for path in sorted(destination.root.rglob("*.ndjson*")):
        relative = path.relative_to(destination.root)
        if relative.parts[0] == ".staging":
            continue
        objects[str(relative)] = path.read_bytes()
    return objects


def decode_rows(objects: dict[str, bytes]) -> list[dict]:
    """Decode NDJSON rows of every object (gzip or plain), in key order."""
    rows = []
    for key in sorted(objects):
        data = objects[key]
        if key.endswith(".gz"):
            data = gzip.decompress(data)
        rows.extend(json.loads(line) for line in data.decode("utf-8").splitlines() if line)
    return rows


def exported_ids(destination: LocalDestination) -> list[int]:
    """Return the ids of every exported row, with repeats, so callers can check exactly-once."""
    return [row["id"] for row in decode_rows(read_local_objects(destination))]
