"""Local S3 API server for tests, demos and benchmarks, backed by moto.

All moto servers in one Python process share moto's in-memory backends, so
two ``S3Server`` instances in the same process see the same buckets.
"""

from __future__ import annotations

import json
import logging
import socket
from urllib.parse import urlencode

import boto3
from moto.server import ThreadedMotoServer

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"


class S3Server:
    """moto S3 server on 127.0.0.1 that runs in a background thread of this process.

    It accepts any credentials. Data lives in memory and is lost when the
    process exits.
    """

    def __init__(self, port: int | None = None):
        """Prepare a server on ``port``, or on a port the OS picks at start when None."""
        self._requested_port = port
        self.port: int | None = port
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        """Base URL of the server, ``http://127.0.0.1:PORT``. Available after ``start()``."""
        if self.port is None:
            raise RuntimeError("S3Server has no port yet. Call start() first.")
        return f"http://{HOST}:{self.port}"

    def start(self) -> S3Server:
        """Start the server thread and return once it accepts connections.

        :raises RuntimeError: if the requested port is already in use.
        """
        if self._server is not None:
            return self

        if self._requested_port is not None:
            # ThreadedMotoServer.start() waits forever when its thread cannot
            # bind, so check the port here to fail with a message instead.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((HOST, self._requested_port))
                except OSError as exc:
                    raise RuntimeError(
                        f"Port {self._requested_port} on {HOST} is not available ({exc}). "
                        "Pass another port or None to let the OS pick one."
                    ) from exc

        server = ThreadedMotoServer(ip_address=HOST, port=self._requested_port or 0, verbose=False)
        server.start()
        self._server = server
        self.port = server.get_host_and_port()[1]
        log.info("Started moto S3 server at %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        """Stop the server thread. Does nothing if it is not running."""
        if self._server is None:
            return
        self._server.stop()
        # NOTE: moto 5.2 ThreadedMotoServer.stop() shuts the server down but
        # leaves its socket open, so close it through the private attribute.
        wsgi_server = getattr(self._server, "_server", None)
        if wsgi_server is not None:
            wsgi_server.server_close()
        self._server = None
        log.info("Stopped moto S3 server at %s", self.endpoint_url)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self):
        """Return a boto3 S3 client for this server with dummy credentials in us-east-1."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` in us-east-1."""
        self.client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str, prefix: str = "", *, page_size: int | None = None) -> list[str]:
        """Return every key in ``bucket`` that starts with ``prefix``, following pagination.

        ``page_size`` sets the keys per ``ListObjectsV2`` request, 1000 when None.
        """
        paginator = self.client().get_paginator("list_objects_v2")
        pagination = {"PageSize": page_size} if page_size is not None else {}
        keys = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pagination):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def get_bytes(self, bucket: str, key: str) -> bytes:
        """Return the content of object ``key`` in ``bucket``."""
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def airflow_connection_uri(self) -> str:
        """Return an Airflow connection URI of type ``aws`` that points at this server.

        Set it as ``AIRFLOW_CONN_<CONN_ID>`` for the amazon provider's hooks.
        Airflow 3.3 (``airflow.sdk.definitions.connection.Connection.from_uri``)
        parses the query string into the connection extra. A ``__extra__``
        parameter contains the whole extra as JSON, which keeps every value's type.
        The amazon provider reads ``endpoint_url`` and ``region_name`` from that
        extra, and login and password become the access key pair.
        """
        extra = {"endpoint_url": self.endpoint_url, "region_name": REGION}
        query = urlencode({"__extra__": json.dumps(extra)})
        return f"aws://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@/?{query}"
