# Airflow image with airflow-audit-export and its DAGs, built by docker-compose.yaml.
# The tag must stay inside the apache-airflow range of pyproject.toml (>=3.3,<3.4);
# tests/test_compose.py checks it.
FROM apache/airflow:3.3.2

# The base image runs as the airflow user, which is the user pip must run as in
# this image. The source is owned by airflow because pip builds the wheel in place.
COPY --chown=airflow:root pyproject.toml README.md /opt/airflow/src/airflow-audit-export/
COPY --chown=airflow:root airflow_audit_export /opt/airflow/src/airflow-audit-export/airflow_audit_export

# Naming apache-airflow at the image's own version (AIRFLOW_VERSION is set by the
# base image) keeps pip from upgrading or downgrading Airflow to satisfy a dependency.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/airflow/src/airflow-audit-export

COPY --chown=airflow:root dags/ /opt/airflow/dags/
