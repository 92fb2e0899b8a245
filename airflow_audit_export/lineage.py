"""The lineage marker: an object in the destination that records which state row wrote there last.

Steady-state object keys carry an xid range, so two databases that share an xid
history can plan the same range with different rows, and the later upload would
replace the earlier objects. That happens after a physical restore of a base
backup, after a failover to an asynchronous replica that missed the last commits,
and with a copy of the data directory that keeps exporting. In each case the state
row comes back with the data, with the same ``system_identifier`` and an xid
counter at or above the cursor, so checks inside the database cannot see it.

The destination can. Each time a run plans a range, it stores a new random
token in the state row and writes it to ``{prefix}/lineage/{export_name}.json``
before the first object of that range. A state row whose tokens do not match
the marker has therefore lost track of writes: it belongs to another lineage.
That run moves to a key epoch above both the state's and the marker's, so its
keys can never match the other lineage's keys, and abandons any pending range.
A physical copy of a database is consistent with its own state row, so no
rows need a backfill: the copy exports its own rows again under new keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from datetime import datetime, timezone

from airflow_audit_export.state import ExportState
from airflow_audit_export.writing import Destination, DestinationError

log = logging.getLogger(__name__)

LINEAGE_FOLDER = "lineage"


def marker_key(prefix: str, export_name: str) -> str:
    """Return the key of an export's lineage marker, next to the backfill manifests."""
    parts = [p for p in (prefix.strip("/"), LINEAGE_FOLDER, f"{export_name}.json") if p]
    return "/".join(parts)


def new_token() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass(frozen=True)
class LineageMarker:
    """The marker's content: the token of the range last planned, and where that range started."""

    export_name: str
    token: str
    key_epoch: int
    system_identifier: str | None
    cursor: int
    written_at: str

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class LineageCheck:
    """Outcome of comparing a state row with the marker: the key epoch to use and, on divergence, why."""

    key_epoch: int
    diverged_reason: str | None = None


def read_marker(destination: Destination, export_name: str) -> LineageMarker | None:
    """Return the export's marker, or ``None`` when the destination has none.

    Raises :class:`DestinationError` when the marker exists but cannot be parsed,
    because guessing could let two lineages write the same keys.
    """
    key = marker_key(destination.prefix, export_name)
    data = destination.read_bytes(key)
    if data is None:
        return None
    try:
        fields = json.loads(data)
        return LineageMarker(
            export_name=fields["export_name"],
            token=fields["token"],
            key_epoch=int(fields["key_epoch"]),
            system_identifier=fields.get("system_identifier"),
            cursor=int(fields["cursor"]),
            written_at=fields["written_at"],
        )
    except (ValueError, KeyError, TypeError) as err:
        raise DestinationError(
            f"The lineage marker {key!r} in {destination.uri!r} is not valid ({err}). If it was edited by hand, "
            "delete it: the next run writes a new one under a new key epoch."
        ) from err


def write_marker(destination: Destination, state: ExportState, token: str, key_epoch: int, cursor: int) -> None:
    """Write the marker for the range about to be written; objects of that range may follow only after it."""
    marker = LineageMarker(
        export_name=state.export_name,
        token=token,
        key_epoch=key_epoch,
        system_identifier=state.system_identifier,
        cursor=cursor,
        written_at=datetime.now(timezone.utc).isoformat(),
    )
    destination.write_bytes(marker_key(destination.prefix, state.export_name), marker.to_bytes())


def check_lineage(state: ExportState, marker: LineageMarker | None) -> LineageCheck:
    """Compare the state row with the marker and return the key epoch this run must use.

    The marker may hold the state's current token, or its previous one when the
    run that planned the current range failed before it wrote the marker. Any
    other token means that another state row, or this one before a restore, has
    written to the destination since.
    """
    if marker is None:
        if state.lineage_token is not None:
            log.warning(
                "Export %s: the destination has no lineage marker, although this state row wrote one before. "
                "This is expected after a change of destination; otherwise the marker was deleted.",
                state.export_name,
            )
        return LineageCheck(key_epoch=state.key_epoch)

    if state.lineage_token is not None and marker.token in (state.lineage_token, state.previous_lineage_token):
        return LineageCheck(key_epoch=state.key_epoch)

    key_epoch = max(state.key_epoch, marker.key_epoch) + 1
    if state.lineage_token is None:
        reason = (
            f"the destination already holds objects of export {state.export_name!r} written by another state row "
            f"(key epoch {marker.key_epoch}, marker written {marker.written_at})"
        )
    else:
        reason = (
            f"the destination's lineage marker (key epoch {marker.key_epoch}, range from xid {marker.cursor}, "
            f"written {marker.written_at}) was written by another copy of this state row: this database was "
            "restored from a backup, failed over to a replica that missed commits, or cloned"
        )
    return LineageCheck(key_epoch=key_epoch, diverged_reason=reason)
