"""Object keys, NDJSON object files and the destinations they are published to.

An object is built in a staging file, then published whole: a local destination
renames it into place, S3 receives it in one upload. A reader of the destination
therefore never reads part of an object.
"""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
import uuid
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

DESTINATION_SCHEMES = ("file", "s3")

#: Documents joined into one write to a staged object. The per-call costs of gzip stay small, and so does the
#: joined copy (about 300 kB for the reference schema's rows).
WRITE_BLOCK_ROWS = 1_000


class DestinationError(ValueError):
    """The destination URI is invalid, or the destination cannot be written."""


class PublishError(RuntimeError):
    """An object could not be stored at its key; the message names the key.

    Not a ``ValueError``: the destination may be down for a while, so the
    task's retries apply.
    """


def utc_day(value: datetime) -> date:
    """Return the UTC calendar day of an aware timestamp."""
    return value.astimezone(timezone.utc).date()


def object_key(prefix: str, day: date, stem: str, compression: str) -> str:
    """Build ``{prefix}/dt=YYYY-MM-DD/{stem}.ndjson[.gz]``; the day folder is the Hive partition."""
    suffix = ".ndjson.gz" if compression == "gzip" else ".ndjson"
    parts = [p for p in (prefix.strip("/"), f"dt={day.isoformat()}", f"{stem}{suffix}") if p]
    return "/".join(parts)


def steady_state_stem(name: str, lo: int, hi: int, sequence: int, epoch: int = 0) -> str:
    """Name a steady-state object by its xid range ``[lo, hi)`` and its sequence number in that range.

    A non-zero ``epoch`` (the state's ``key_epoch``) marks objects written after a
    re-anchor onto another xid history, whose xid ranges may repeat older ones.
    """
    epoch_part = f"e{epoch}_" if epoch else ""
    return f"{name}_xmin_{epoch_part}{lo}-{hi}_{sequence:06d}"


class Destination(Protocol):
    """Target of finished objects; ``uri`` is also the Airflow Asset URI."""

    uri: str
    prefix: str

    def staging_dir(self) -> str: ...

    def check_writable(self) -> None: ...

    def publish(self, staged_path: str, key: str) -> None: ...

    def read_bytes(self, key: str) -> bytes | None: ...

    def write_bytes(self, key: str, data: bytes) -> None: ...


class LocalDestination:
    """A folder on the worker; objects are renamed into place from a staging folder on the same filesystem."""

    def __init__(self, uri: str, root: Path) -> None:
        self.uri = uri
        self.root = root
        self.prefix = ""

    def staging_dir(self) -> str:
        path = self.root / ".staging"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = Path(self.staging_dir()) / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise DestinationError(
                f"Destination {self.uri!r} is not writable ({err.strerror}): create the folder and give the "
                "Airflow worker's user write access, or set AUDIT_EXPORT_DESTINATION to another folder."
            ) from err

    def publish(self, staged_path: str, key: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged_path, target)

    def read_bytes(self, key: str) -> bytes | None:
        """Return the bytes of a small object such as a marker, or ``None`` when it does not exist."""
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object whole: staged, flushed, then renamed into place."""
        fd, staged_path = tempfile.mkstemp(prefix=".partial-", dir=self.staging_dir())
        with os.fdopen(fd, "wb") as staged:
            staged.write(data)
            staged.flush()
            os.fsync(staged.fileno())
        self.publish(staged_path, key)

    def path_of(self, key: str) -> Path:
        return self.root / key


class S3Destination:
    """An S3 bucket and prefix reached through the Amazon provider's ``S3Hook`` (MinIO via ``endpoint_url``)."""

    def __init__(self, uri: str, bucket: str, prefix: str, aws_conn_id: str | None) -> None:
        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.aws_conn_id = aws_conn_id
        self._hook = None

    @property
    def hook(self):
        if self._hook is None:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            self._hook = S3Hook(aws_conn_id=self.aws_conn_id)
        return self._hook

    def staging_dir(self) -> str:
        return tempfile.gettempdir()

    def check_writable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.hook.get_conn().head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise DestinationError(
                    f"Bucket {self.bucket!r} of destination {self.uri!r} was not found: create it or fix "
                    "AUDIT_EXPORT_DESTINATION."
                ) from err
            raise DestinationError(
                f"Cannot access bucket {self.bucket!r} through connection {self.aws_conn_id!r} ({code}): check "
                "the connection's credentials and the bucket policy."
            ) from err
        except NoCredentialsError as err:
            raise DestinationError(
                f"No AWS credentials for destination {self.uri!r}: connection {self.aws_conn_id!r} is not defined "
                "or has no keys, and the worker has no credentials of its own. Define the connection, for example "
                f"AIRFLOW_CONN_{str(self.aws_conn_id).upper()}='aws://KEY:SECRET@/?region_name=eu-west-1', or give "
                "the worker AWS credentials (an instance role or AWS_* environment variables)."
            ) from err
        except BotoCoreError as err:
            raise DestinationError(
                f"Cannot reach destination {self.uri!r} through connection {self.aws_conn_id!r}: {err}"
            ) from err

    def publish(self, staged_path: str, key: str) -> None:
        """Upload a staged object and delete its staging file, whether the upload succeeded or not.

        An object below the connection's multipart threshold (8 MiB unless
        ``transfer_config_args`` sets another) goes in one ``PutObject``
        request. A larger one goes through ``S3Hook.load_file``, which sends
        parts in parallel. That managed transfer starts a thread pool on every
        call: for a 200 kB object it cost 7 ms of client CPU against 5 ms for
        ``PutObject``, measured against a loopback moto server.
        """
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if os.path.getsize(staged_path) < self.hook.transfer_config.multipart_threshold:
                with open(staged_path, "rb") as body:
                    self.hook.get_conn().put_object(Bucket=self.bucket, Key=key, Body=body, **self.hook.extra_args)
            else:
                self.hook.load_file(filename=staged_path, key=key, bucket_name=self.bucket, replace=True)
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            raise PublishError(
                f"Cannot upload s3://{self.bucket}/{key} through connection {self.aws_conn_id!r}: {err}"
            ) from err
        finally:
            os.unlink(staged_path)

    def read_bytes(self, key: str) -> bytes | None:
        """Return the bytes of a small object such as a marker, or ``None`` when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            response = self.hook.get_conn().get_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise DestinationError(
                f"Cannot read s3://{self.bucket}/{key} through connection {self.aws_conn_id!r} ({code}): the "
                "export needs s3:GetObject as well as s3:PutObject on its prefix."
            ) from err
        return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object in one PUT."""
        self.hook.get_conn().put_object(Bucket=self.bucket, Key=key, Body=data)


def parse_destination(uri: str, *, aws_conn_id: str | None = "aws_default") -> Destination:
    """Build a destination from ``file:///absolute/path`` or ``s3://bucket/prefix``."""
    if not isinstance(uri, str) or not uri:
        raise DestinationError(f"Invalid destination {uri!r}: expected file:///absolute/path or s3://bucket/prefix.")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DestinationError(
                f"Invalid destination {uri!r}: a file URI needs three slashes and an absolute path, "
                "for example file:///var/lib/audit-export."
            )
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise DestinationError(f"Invalid destination {uri!r}: the path must be absolute.")
        return LocalDestination(uri.rstrip("/"), path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise DestinationError(f"Invalid destination {uri!r}: expected s3://bucket/prefix with a bucket name.")
        return S3Destination(uri.rstrip("/"), parsed.netloc, parsed.path, aws_conn_id)
    raise DestinationError(
        f"Invalid destination {uri!r}: scheme {parsed.scheme!r} is not supported; use one of "
        f"{', '.join(s + '://' for s in DESTINATION_SCHEMES)}."
    )


class StagedObject:
    """An NDJSON object being written to a staging file, gzip-compressed with a fixed header.

    The gzip header carries no file name and a zero mtime, so the same rows
    always produce the same bytes.
    """

    def __init__(self, staging_dir: str, compression: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=".partial-", suffix=".ndjson", dir=staging_dir)
        self._raw: IO[bytes] = os.fdopen(fd, "wb")
        self._out: IO[bytes] = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
            if compression == "gzip"
            else self._raw
        )
        self.rows = 0

    def write(self, document: str) -> None:
        self._out.write(document.encode("utf-8"))
        self._out.write(b"\n")
        self.rows += 1

    def write_many(self, documents: list[str]) -> None:
        """Append documents as NDJSON lines with one joined write, which gives the same bytes as one ``write`` each."""
        if documents:
            self._out.write("\n".join(documents).encode("utf-8"))
            self._out.write(b"\n")
            self.rows += len(documents)

    def finish(self) -> int:
        """Flush to disk and return the object's size in bytes."""
        if self._out is not self._raw:
            self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        size = self._raw.tell()
        self._raw.close()
        return size

    def discard(self) -> None:
        for stream in (self._out, self._raw):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
