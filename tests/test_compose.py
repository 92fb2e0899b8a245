"""Static checks of docker-compose.yaml and Dockerfile against what the DAGs and connections need.

No Docker engine is needed. The file is parsed with PyYAML, and variables are
replaced by their defaults as Compose interpolates them. The connections are
parsed with Airflow's own URI parser.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from airflow.sdk.definitions.connection import Connection
from packaging.requirements import Requirement
from packaging.version import Version

from airflow_audit_export.dag_settings import DagSettings
from airflow_audit_export.testing.schema import EXPORT_ROLE
from airflow_audit_export.testing.seed import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-init",
    "airflow-cli",
)
# Long-running Airflow services, which must wait for airflow-init.
GATED_AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
REQUIRED_SERVICES = (*AIRFLOW_SERVICES, "postgres", "audit-db", "audit-seed", "audit-writer", "minio", "minio-init")
EXECUTION_API_URL = "http://airflow-apiserver:8080/execution/"
MINIO_ENDPOINT = "http://minio:9000"
SEED_MODULE = "airflow_audit_export.testing.seed"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, $NAME, or the escape $$.
_VARIABLE = re.compile(
    r"\$(?:(?P<escape>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, environ: dict[str, str]):
    """Replace Compose variables in every string of ``value``, with Compose's rules for the forms above."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group("escape"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op = match.group("op") or ""
        current = environ.get(name)
        if op == ":-" and not current:
            return match.group("default")
        if op == "-" and current is None:
            return match.group("default")
        if op in (":?", "?") and not current:
            raise ValueError(f"Compose variable {name} is required: {match.group('default')}")
        return current or ""

    return _VARIABLE.sub(replace, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yaml with every variable at its default, as with an empty environment."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return interpolate(raw, environ={})


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment_of(service: dict) -> dict[str, str]:
    """Return a service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_list(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def depends_on(service: dict) -> dict[str, str]:
    """Return ``{service: condition}`` from either form of ``depends_on``."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def seed_arguments(service: dict):
    """Parse a seed service's command with the seed CLI's own parser."""
    command = command_list(service)
    assert command[:3] == ["python", "-m", SEED_MODULE], f"command runs {command[:3]}, not the seed module"
    return build_parser().parse_args(command[3:])


def published_ports(service: dict) -> dict[int, tuple[str, int]]:
    """Return ``{container port: (host ip, host port)}`` from the short port syntax."""
    ports = {}
    for entry in service.get("ports") or []:
        parts = str(entry).split(":")
        if len(parts) == 3:
            host_ip, host_port, container = parts
        elif len(parts) == 2:
            host_ip, (host_port, container) = "0.0.0.0", parts
        else:
            continue
        ports[int(container.split("/")[0])] = (host_ip, int(host_port))
    return ports


def test_required_services_exist(services):
    for name in REQUIRED_SERVICES:
        assert name in services, f"service {name} is missing from {COMPOSE_FILE.name}"


def test_airflow_services_share_environment(services):
    postgres_env = environment_of(services["postgres"])
    secrets = {}
    for name in AIRFLOW_SERVICES:
        env = environment_of(services[name])
        assert env.get("AIRFLOW__CORE__EXECUTOR") == "LocalExecutor", f"{name} does not use LocalExecutor"
        assert env.get("AIRFLOW__API_AUTH__JWT_SECRET"), f"{name} has no AIRFLOW__API_AUTH__JWT_SECRET"
        assert env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL") == EXECUTION_API_URL, (
            f"{name} has execution API URL {env.get('AIRFLOW__CORE__EXECUTION_API_SERVER_URL')!r}, "
            f"expected {EXECUTION_API_URL}"
        )
        secrets[name] = env["AIRFLOW__API_AUTH__JWT_SECRET"]

        database = urlsplit(env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""))
        assert database.hostname == "postgres", f"{name} metadata database host is {database.hostname!r}"
        assert database.username == postgres_env["POSTGRES_USER"], f"{name} metadata database user differs"
        assert database.password == postgres_env["POSTGRES_PASSWORD"], f"{name} metadata database password differs"
        assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"], f"{name} metadata database name differs"

    assert len(set(secrets.values())) == 1, f"Airflow services use different JWT secrets: {sorted(secrets)}"


def test_airflow_services_use_built_image(services):
    images = {name: services[name].get("image") for name in (*AIRFLOW_SERVICES, "audit-seed", "audit-writer")}
    for name, image in images.items():
        assert services[name].get("build") == ".", f"{name} does not build the Dockerfile in the repository root"
        assert image, f"{name} has no image name, so Compose would build an unnamed image per service"
    assert len(set(images.values())) == 1, f"services name different images: {images}"


def test_apiserver_serves_api_and_health(services):
    apiserver = services["airflow-apiserver"]
    healthcheck = " ".join(apiserver["healthcheck"]["test"])
    assert command_list(apiserver) == ["api-server"], "airflow-apiserver does not run `airflow api-server`"
    assert "http://localhost:8080/api/v2/" in healthcheck, f"unexpected apiserver healthcheck {healthcheck!r}"


def test_airflow_init_migrates_and_creates_user(services):
    env = environment_of(services["airflow-init"])
    assert env.get("_AIRFLOW_DB_MIGRATE") == "true", "airflow-init does not set _AIRFLOW_DB_MIGRATE"
    assert env.get("_AIRFLOW_WWW_USER_CREATE") == "true", "airflow-init does not create the UI user"
    assert env.get("_AIRFLOW_WWW_USER_USERNAME"), "airflow-init has no UI user name"
    assert env.get("_AIRFLOW_WWW_USER_PASSWORD"), "airflow-init has no UI password"
    assert "/entrypoint" in " ".join(command_list(services["airflow-init"])), (
        "airflow-init does not run the image's /entrypoint, which performs the migration"
    )


def test_audit_db_connection_points_at_seeded_database(services):
    env = environment_of(services["airflow-scheduler"])
    conn = Connection.from_uri(env["AIRFLOW_CONN_AUDIT_DB"], conn_id="audit_db")
    audit_db_env = environment_of(services["audit-db"])
    seed = seed_arguments(services["audit-seed"])
    seed_target = urlsplit(seed.dsn)
    seed_password = environment_of(services["audit-seed"]).get("AUDIT_EXPORTER_PASSWORD")

    assert conn.conn_type == "postgres", f"AIRFLOW_CONN_AUDIT_DB has type {conn.conn_type!r}"
    assert conn.host == "audit-db", f"AIRFLOW_CONN_AUDIT_DB points at host {conn.host!r}, not audit-db"
    assert conn.port == 5432, f"AIRFLOW_CONN_AUDIT_DB uses port {conn.port}"
    assert conn.schema == audit_db_env["POSTGRES_DB"], (
        f"AIRFLOW_CONN_AUDIT_DB uses database {conn.schema!r}, audit-db creates {audit_db_env['POSTGRES_DB']!r}"
    )
    assert seed_target.hostname == "audit-db", f"the seed connects to {seed_target.hostname!r}, not audit-db"
    assert unquote(seed_target.path.lstrip("/")) == conn.schema, "the seed fills another database than the export reads"
    assert conn.login == EXPORT_ROLE, f"AIRFLOW_CONN_AUDIT_DB logs in as {conn.login!r}, not {EXPORT_ROLE}"
    assert conn.password, "AIRFLOW_CONN_AUDIT_DB has no password"
    assert conn.password == seed_password, "AIRFLOW_CONN_AUDIT_DB password differs from the one the seed sets"


def test_aws_connection_points_at_minio(services):
    env = environment_of(services["airflow-scheduler"])
    conn = Connection.from_uri(env["AIRFLOW_CONN_AWS_DEFAULT"], conn_id="aws_default")
    minio_env = environment_of(services["minio"])
    extra = conn.extra_dejson

    assert conn.conn_type == "aws", f"AIRFLOW_CONN_AWS_DEFAULT has type {conn.conn_type!r}"
    assert extra.get("endpoint_url") == MINIO_ENDPOINT, (
        f"AIRFLOW_CONN_AWS_DEFAULT endpoint_url is {extra.get('endpoint_url')!r}, expected {MINIO_ENDPOINT}"
    )
    assert extra.get("region_name"), "AIRFLOW_CONN_AWS_DEFAULT has no region_name"
    assert conn.login == minio_env["MINIO_ROOT_USER"], "AIRFLOW_CONN_AWS_DEFAULT access key differs from MinIO's"
    assert conn.password == minio_env["MINIO_ROOT_PASSWORD"], "AIRFLOW_CONN_AWS_DEFAULT secret key differs from MinIO's"
    assert "server" in command_list(services["minio"]), "the minio service does not run `minio server`"


def test_destination_bucket_is_created(services):
    env = environment_of(services["airflow-scheduler"])
    destination = urlsplit(env["AUDIT_EXPORT_DESTINATION"])
    script = " ".join(command_list(services["minio-init"]))
    created = re.findall(r"mc mb (?:--ignore-existing )?\S+?/([a-z0-9.-]+)", script)

    assert destination.scheme == "s3", f"AUDIT_EXPORT_DESTINATION {destination.geturl()!r} is not an s3:// URI"
    assert created, f"minio-init runs no `mc mb`: {script!r}"
    assert destination.netloc in created, (
        f"AUDIT_EXPORT_DESTINATION uses bucket {destination.netloc!r}, minio-init creates {created}"
    )
    assert f"http://{urlsplit(MINIO_ENDPOINT).netloc}" in script, "minio-init does not talk to the minio service"


def test_connection_ids_match_dag_defaults(services):
    env = environment_of(services["airflow-scheduler"])
    defaults = DagSettings.from_environment({})
    settings = DagSettings.from_environment(env)

    assert settings.postgres_conn_id == defaults.postgres_conn_id, (
        f"the stack uses postgres conn id {settings.postgres_conn_id!r}, the DAG default is {defaults.postgres_conn_id!r}"
    )
    assert settings.aws_conn_id == defaults.aws_conn_id, (
        f"the stack uses aws conn id {settings.aws_conn_id!r}, the DAG default is {defaults.aws_conn_id!r}"
    )
    for conn_id in (settings.postgres_conn_id, settings.aws_conn_id):
        variable = f"AIRFLOW_CONN_{conn_id.upper()}"
        assert variable in env, f"connection {conn_id} has no {variable} in the Airflow environment"


def test_dag_settings_parse_from_stack_environment(services):
    env = environment_of(services["airflow-scheduler"])

    settings = DagSettings.from_environment(env)

    assert settings.destination == "s3://audit-export/audit", f"unexpected destination {settings.destination!r}"
    assert settings.table == "public.audit_partitioned", f"the stack exports {settings.table!r}, not the seeded table"
    assert settings.gap_policy in ("backfill", "record"), f"invalid gap policy {settings.gap_policy!r}"


def test_seed_commands_parse_with_seed_cli(services):
    seed = seed_arguments(services["audit-seed"])
    writer = seed_arguments(services["audit-writer"])

    assert seed.keep_writing is None, "audit-seed must finish, but it passes --keep-writing"
    assert seed.history_rows > 0, "audit-seed inserts no history rows"
    assert writer.keep_writing is not None, "audit-writer does not pass --keep-writing"
    assert writer.dsn == seed.dsn, "audit-writer writes to another database than audit-seed seeds"
    for name in ("audit-seed", "audit-writer"):
        env = environment_of(services[name])
        assert env.get("PGPASSWORD"), f"{name} has no PGPASSWORD for the database owner"
        assert env["PGPASSWORD"] == environment_of(services["audit-db"])["POSTGRES_PASSWORD"], (
            f"{name} PGPASSWORD differs from the audit-db owner password"
        )


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith((".", "/", "~")):
                continue
            assert source in declared, f"service {name} mounts volume {source!r}, which is not declared"
    for name in ("postgres", "audit-db", "minio"):
        assert services[name].get("volumes"), f"service {name} keeps its data in no volume"


def test_ports_are_published(services):
    expected = {"airflow-apiserver": (8080,), "minio": (9000, 9001)}
    for name, ports in expected.items():
        published = published_ports(services[name])
        for port in ports:
            assert port in published, f"{name} does not publish container port {port}"
            assert published[port][1] == port, f"{name} publishes {port} on host port {published[port][1]}"


def test_depends_on_targets_exist(services):
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            assert condition in valid, f"{name} waits for {target} with unknown condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, but it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") in (None, "no"), (
                    f"{name} waits for {target} to complete, but {target} restarts"
                )


@pytest.mark.parametrize(
    ("service", "target", "condition"),
    [
        *[(name, "airflow-init", "service_completed_successfully") for name in GATED_AIRFLOW_SERVICES],
        *[(name, "postgres", "service_healthy") for name in (*GATED_AIRFLOW_SERVICES, "airflow-cli")],
        ("airflow-scheduler", "audit-seed", "service_completed_successfully"),
        ("airflow-scheduler", "minio-init", "service_completed_successfully"),
        ("audit-writer", "audit-seed", "service_completed_successfully"),
        ("audit-seed", "audit-db", "service_healthy"),
        ("minio-init", "minio", "service_healthy"),
        ("airflow-init", "postgres", "service_healthy"),
    ],
)
def test_init_services_gate_others(services, service, target, condition):
    actual = depends_on(services[service]).get(target)

    assert actual == condition, f"{service} should wait for {target} with {condition}, found {actual!r}"


def test_dockerfile_base_image_matches_pyproject():
    base = re.search(r"^FROM\s+apache/airflow:(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    dependencies = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    airflow = next(Requirement(dep) for dep in dependencies if Requirement(dep).name == "apache-airflow")

    assert base, "the Dockerfile does not start FROM apache/airflow:<tag>"
    tag = base.group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"base image tag {tag!r} is not a pinned X.Y.Z version"
    assert Version(tag) in airflow.specifier, f"base image apache/airflow:{tag} is outside {airflow}"


def test_dockerfile_installs_package_and_dags():
    text = DOCKERFILE.read_text(encoding="utf-8")

    assert re.search(r"^RUN pip install --no-cache-dir .*\"apache-airflow==\$\{AIRFLOW_VERSION\}\"", text, re.M), (
        "the Dockerfile does not pip install with --no-cache-dir and apache-airflow pinned to the image version"
    )
    assert not re.search(r"^USER\s+root", text, re.M), "the Dockerfile switches to root, but pip must run as airflow"
    assert re.search(r"^COPY .*\bdags/?\s+/opt/airflow/dags/?$", text, re.M), "the Dockerfile does not copy dags/"
