"""Throwaway PostgreSQL cluster for tests, demos and benchmarks.

The cluster runs the PostgreSQL server binaries installed on the machine. It
listens on 127.0.0.1 only, trusts every connection and keeps its data, Unix
socket and server log in one base directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

log = logging.getLogger(__name__)

PG_BIN_ENV = "AUDIT_EXPORT_PG_BIN"
"""Environment variable that names the directory with ``initdb`` and ``pg_ctl``."""

SERVER_USER = "postgres"
"""OS user that runs the server when this process runs as root."""

DEFAULT_SETTINGS: dict[str, str] = {
    "max_prepared_transactions": "20",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "128MB",
    "listen_addresses": "127.0.0.1",
    "log_min_messages": "warning",
    "logging_collector": "off",
}
"""Server settings written to ``postgresql.conf``.

``unix_socket_directories`` is added per cluster. The settings trade crash
safety for speed, which is only acceptable for a cluster that is thrown away.
"""

_START_TIMEOUT_SECONDS = 60
_LOG_TAIL_LINES = 30
# Linux limits a Unix socket path to 107 bytes. The socket file name is
# ".s.PGSQL.<port>.lock" at most, so the directory gets what is left.
_MAX_SOCKET_DIR_LENGTH = 107 - len("/.s.PGSQL.65535.lock")
_PORT_ATTEMPTS = 3


def find_bin_dir(bin_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory that contains the PostgreSQL server programs.

    The lookup order is the ``bin_dir`` argument, the ``AUDIT_EXPORT_PG_BIN``
    environment variable, ``pg_config --bindir`` and then the highest version
    under ``/usr/lib/postgresql/*/bin``. A directory given by argument or
    environment variable must contain ``initdb`` and ``pg_ctl``. Otherwise a
    ``RuntimeError`` is raised instead of falling through to the next source.
    """
    explicit = [(bin_dir, "the bin_dir argument"), (os.environ.get(PG_BIN_ENV), PG_BIN_ENV)]
    for candidate, source in explicit:
        if not candidate:
            continue
        path = Path(candidate)
        if _has_server_programs(path):
            return path
        raise RuntimeError(
            f"{source} is {str(path)!r}, but that directory does not contain initdb and pg_ctl. "
            "Point it at the bin directory of a PostgreSQL server installation, "
            "for example /usr/lib/postgresql/15/bin."
        )

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("Ignoring pg_config at %s because it failed: %s", pg_config, exc)
        else:
            path = Path(result.stdout.strip())
            # libpq-dev ships a pg_config whose bindir may lack the server programs.
            if _has_server_programs(path):
                return path
            log.debug("pg_config reports bindir %s, which has no initdb", path)

    versioned = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        version = path.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) and _has_server_programs(path):
            versioned.append((tuple(int(part) for part in version.split(".")), path))
    if versioned:
        return max(versioned)[1]

    raise RuntimeError(
        "PostgreSQL server programs (initdb, pg_ctl) not found. Install the PostgreSQL server, "
        "for example `apt-get install postgresql-15` on Debian or Ubuntu, or set "
        f"{PG_BIN_ENV} to the directory that contains initdb."
    )


def _has_server_programs(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free when this function ran.

    Another process can take the port before the caller binds it, so callers
    that can retry with a new port should do so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """Throwaway PostgreSQL cluster that listens on the loopback interface only.

    Not for production use: ``pg_hba.conf`` trusts every local and
    127.0.0.1/32 connection without a password, and fsync and full page writes
    are off, so a crash of the machine loses the data. Passwords given to
    :meth:`conninfo`, :meth:`uri` and :meth:`connect` are sent but not checked.

    When the process runs as root, the server programs run as the ``postgres``
    OS user through ``runuser`` because ``initdb`` rejects root. The base
    directory is then owned by that user, and every parent directory must let
    it enter.

    ``start()`` registers ``stop()`` with :mod:`atexit`, so a server left
    running by a test session that raised is stopped when Python exits. A
    process killed by a signal such as SIGKILL leaves the server running.
    """

    host = "127.0.0.1"
    superuser = SERVER_USER

    def __init__(
        self,
        base_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        bin_dir: str | None = None,
    ):
        """Prepare a cluster in ``base_dir`` without starting it.

        :param base_dir: Directory for the data directory, socket and server log.
            A new temporary directory is created when it is None.
            ``cleanup()`` deletes the base directory only when this class
            created it. Otherwise it deletes the data directory and server log.
        :param port: TCP port on 127.0.0.1. A free port is picked when None, and
            ``start()`` retries with another port if that one gets taken.
        :param settings: Server settings that override or extend
            :data:`DEFAULT_SETTINGS`. Values are raw strings, and this class quotes them.
        :param bin_dir: Directory with ``initdb`` and ``pg_ctl``, see :func:`find_bin_dir`.
        """
        self.bin_dir = find_bin_dir(bin_dir)
        self._run_as = self._server_user_prefix()

        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="audit-export-pg-"))
            self._owns_base_dir = True
        else:
            self.base_dir = Path(base_dir).absolute()
            self._owns_base_dir = not self.base_dir.exists()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.base_dir)) > _MAX_SOCKET_DIR_LENGTH:
            raise ValueError(
                f"base_dir {str(self.base_dir)!r} is longer than {_MAX_SOCKET_DIR_LENGTH} characters, "
                "so the Unix socket path inside it would exceed the 107-byte limit. "
                "Use a shorter base directory."
            )

        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "server.log"
        self._port_given = port is not None
        self.port = port if port is not None else find_free_port(self.host)

        self.settings: dict[str, str] = dict(DEFAULT_SETTINGS)
        self.settings["unix_socket_directories"] = str(self.base_dir)
        self.settings.update(settings or {})
        if "port" in self.settings:
            raise ValueError("Pass the port as the port argument, not in settings.")

        self._running = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> PostgresCluster:
        """Initialize the cluster on first use and start the server.

        Returns once the server accepts connections. Calling it on a running
        cluster does nothing.

        :raises RuntimeError: if ``initdb`` or the server start fails. The
            message contains the tail of the server log.
        """
        if self._running:
            return self

        began = time.monotonic()
        self._prepare_base_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._run_pg_ctl(
                "start", "-w", "-t", str(_START_TIMEOUT_SECONDS),
                "-l", str(self.log_file), "-o", f"-p {self.port}",
            )  # fmt: skip
            if result.returncode == 0:
                break

            new_log = self._read_log(log_offset)
            port_taken = "could not bind" in new_log or "Address already in use" in new_log
            if port_taken and not self._port_given and attempt < _PORT_ATTEMPTS:
                old_port, self.port = self.port, find_free_port(self.host)
                log.warning("Port %s was taken, retrying the server start on port %s", old_port, self.port)
                continue
            raise RuntimeError(
                f"pg_ctl start failed for data directory {self.data_dir} on port {self.port} "
                f"(exit code {result.returncode}): {result.stdout.strip()} {result.stderr.strip()}\n"
                f"Last lines of {self.log_file}:\n{_tail(new_log)}"
            )

        self._running = True
        atexit.register(self.stop)
        log.info(
            "Started PostgreSQL at %s:%s with data directory %s in %.2f s",
            self.host, self.port, self.data_dir, time.monotonic() - began,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast``. Does nothing if it is not running."""
        atexit.unregister(self.stop)
        if not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return

        result = self._run_pg_ctl("stop", "-m", "fast", "-w", "-t", str(_START_TIMEOUT_SECONDS))
        self._running = False
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl stop failed for data directory {self.data_dir} (exit code {result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}"
            )
        log.info("Stopped PostgreSQL at %s:%s", self.host, self.port)

    def restart(self) -> None:
        """Stop the server and start it again with the same data and port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its files.

        Deletes the whole base directory if this class created it, otherwise
        only the data directory and the server log inside it.
        """
        self.stop()
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_file.unlink(missing_ok=True)
        log.info("Removed PostgreSQL files under %s", self.base_dir)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- connections -------------------------------------------------------

    def conninfo(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """Return a libpq ``key=value`` connection string for a TCP connection."""
        params = {"host": self.host, "port": self.port, "dbname": dbname, "user": user or self.superuser}
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def uri(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """Return a ``postgresql://`` URI with URL-quoted user, password and database."""
        userinfo = quote(user or self.superuser, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def connect(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        autocommit: bool = True,
    ) -> psycopg.Connection:
        """Open a psycopg connection to ``dbname``. The caller closes it."""
        return psycopg.connect(self.conninfo(dbname, user, password), autocommit=autocommit)

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it already exists."""
        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists:
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                # Another session created it between the check and the CREATE.
                return
        log.info("Created database %s", name)

    def take_base_backup(self) -> PostgresCluster:
        """Copy this running cluster with ``pg_basebackup`` into a new, stopped cluster.

        The copy is a physical one, as a base backup restored by an operator or a
        clone of the data directory would be: it keeps the ``system_identifier``,
        the xid counter and every database as of the backup's end. Start it with
        :meth:`start`; it listens on its own port and socket directory.
        """
        own_settings = {k: v for k, v in self.settings.items() if k != "unix_socket_directories"}
        copy = PostgresCluster(settings=own_settings, bin_dir=str(self.bin_dir))
        copy._prepare_base_dir()
        command = [
            *self._run_as, str(self.bin_dir / "pg_basebackup"),
            "-h", self.host, "-p", str(self.port), "-U", self.superuser,
            "-D", str(copy.data_dir), "-X", "stream", "-c", "fast", "--no-sync",
        ]  # fmt: skip
        result = self._run(command)
        if result.returncode != 0:
            copy.cleanup()
            raise RuntimeError(
                f"pg_basebackup of {self.host}:{self.port} failed (exit code {result.returncode}):\n"
                f"{_tail(result.stdout + result.stderr)}"
            )

        # The copied postgresql.conf still names this cluster's socket directory; later lines win.
        with open(copy.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"unix_socket_directories = {_quote_setting(str(copy.base_dir))}\n")
        log.info("Took a base backup of %s:%s into %s", self.host, self.port, copy.data_dir)
        return copy

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _server_user_prefix() -> list[str]:
        if os.geteuid() != 0:
            # NOTE: untested, because the test suite has only run as root,
            # which takes the runuser path below.
            return []
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise RuntimeError(
                f"Running as root, but the OS user {SERVER_USER!r} does not exist, and initdb rejects root. "
                "Install the PostgreSQL server package, which creates that user, or run as a non-root user."
            ) from None
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError(
                f"Running as root needs runuser (util-linux) to run initdb as {SERVER_USER!r}, "
                "but runuser was not found. Install util-linux or run as a non-root user."
            )
        return [runuser, "-u", SERVER_USER, "--"]

    def _prepare_base_dir(self) -> None:
        if not self._run_as:
            return
        account = pwd.getpwnam(SERVER_USER)
        # mkdtemp creates the directory with mode 0700, which the server user cannot enter.
        self.base_dir.chmod(0o755)
        os.chown(self.base_dir, account.pw_uid, account.pw_gid)
        check = self._run([*self._run_as, "test", "-w", str(self.base_dir)])
        if check.returncode != 0:
            raise RuntimeError(
                f"The OS user {SERVER_USER!r} cannot write to {self.base_dir}. "
                "Make every parent directory searchable for that user, for example with chmod o+x, "
                "or pass base_dir=None to use a new temporary directory."
            )

    def _initdb(self) -> None:
        command = [
            *self._run_as, str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir), "-A", "trust", "-U", self.superuser,
            "--encoding", "UTF8", "--locale", "C", "--no-sync",
        ]  # fmt: skip
        result = self._run(command)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed for {self.data_dir} (exit code {result.returncode}):\n"
                f"{_tail(result.stdout + result.stderr)}"
            )

        # Later lines in postgresql.conf override earlier ones.
        lines = ["", "# Settings for a throwaway test cluster, see airflow_audit_export.testing.pgcluster"]
        lines += [f"{name} = {_quote_setting(value)}" for name, value in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")

        hba = (
            "# Throwaway test cluster: trust local and loopback connections only.\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        (self.data_dir / "pg_hba.conf").write_text(hba, encoding="utf-8")
        log.debug("Initialized PostgreSQL data directory %s", self.data_dir)

    def _run_pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([*self._run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args])

    def _run(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        log.debug("Running %s", command)
        # cwd must be a directory the server user can enter, or the programs warn.
        return subprocess.run(
            command,
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_SECONDS + 30,
            env={**os.environ, "LC_ALL": "C"},
        )

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                handle.seek(offset)
                return handle.read()
        except FileNotFoundError:
            return "(server log not found)"


def _quote_setting(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
