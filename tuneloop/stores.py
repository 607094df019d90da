"""Shared stores: one PostgreSQL server and one S3 bucket instead of SQLite files and local folders.

A team's registry, Prefect server, DVC remote and inference log must be shared by every person and
machine. Two environment variables move all four at once (``TUNELOOP_DATABASE_URL`` and
``TUNELOOP_S3_URL``, see docs/shared-stores.md); this module derives each store's own address from
them, so that nobody has to keep five URLs consistent by hand, and creates the databases and the bucket
on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

# `tuneloop up --stores`: embedded files and folders (or whatever TUNELOOP_DATABASE_URL / TUNELOOP_S3_URL
# name), or a local PostgreSQL and S3 endpoint started with the stack for the stores not named there.
STORE_CHOICES = ("env", "postgres+s3")
# One database per store on the shared PostgreSQL server.
MLFLOW_DATABASE = "mlflow"
MLFLOW_AUTH_DATABASE = "mlflow_auth"
PREFECT_DATABASE = "prefect"
INFERENCE_LOG_DATABASE = "inference_log"
DATABASES = (MLFLOW_DATABASE, MLFLOW_AUTH_DATABASE, PREFECT_DATABASE, INFERENCE_LOG_DATABASE)
# Prefixes in the shared bucket.
MLFLOW_ARTIFACTS_PREFIX = "mlartifacts"
DVC_PREFIX = "dvc"


def _with_database(server_url: str, database: str, driver: str | None = None) -> str:
    """``postgresql://user:pw@host:port[/anything]`` with its path set to ``database`` (and a driver)."""
    parts = urlsplit(server_url)
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


@dataclass(frozen=True)
class SharedStores:
    """Where each store lives when the stack runs on PostgreSQL and/or S3 (either may be None: embedded)."""

    # postgresql://USER[:PASSWORD]@HOST:PORT (a database in the path is ignored).
    database_url: str | None
    # s3://BUCKET[/PREFIX]
    s3_url: str | None
    # An S3-compatible endpoint (MinIO, moto, Ceph…); None: AWS itself.
    s3_endpoint_url: str | None = None
    # Put before each database name, so that several stacks (dev, staging…) can share one server.
    database_prefix: str = ""

    def __post_init__(self) -> None:
        if self.database_prefix and not self.database_prefix.replace("_", "").isalnum():
            raise ValueError(f"TUNELOOP_DATABASE_PREFIX takes [A-Za-z0-9_], not {self.database_prefix!r}")
        scheme = urlsplit(self.database_url or "postgresql://").scheme.split("+")[0]
        if scheme not in {"postgresql", "postgres"}:
            raise ValueError(f"TUNELOOP_DATABASE_URL must be a postgresql:// URL, got {scheme}://")
        if self.s3_url is not None and (
            urlsplit(self.s3_url).scheme != "s3" or not urlsplit(self.s3_url).netloc
        ):
            raise ValueError(f"TUNELOOP_S3_URL must look like s3://bucket[/prefix], got {self.s3_url!r}")

    def database(self, name: str, driver: str | None = None) -> str | None:
        if not self.database_url:
            return None
        return _with_database(self.database_url, self.database_prefix + name, driver)

    @property
    def mlflow_backend_store_uri(self) -> str | None:
        return self.database(MLFLOW_DATABASE)

    @property
    def mlflow_auth_database_uri(self) -> str | None:
        return self.database(MLFLOW_AUTH_DATABASE)

    @property
    def prefect_database_url(self) -> str | None:
        """Prefect's server speaks asyncpg (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        return self.database(PREFECT_DATABASE, "asyncpg")

    @property
    def inference_log_url(self) -> str | None:
        return self.database(INFERENCE_LOG_DATABASE, "psycopg2")

    @property
    def bucket(self) -> str | None:
        return urlsplit(self.s3_url).netloc if self.s3_url else None

    def s3_location(self, prefix: str) -> str | None:
        return f"{self.s3_url.rstrip('/')}/{prefix}" if self.s3_url else None

    @property
    def mlflow_artifacts_destination(self) -> str | None:
        return self.s3_location(MLFLOW_ARTIFACTS_PREFIX)

    @property
    def dvc_remote_url(self) -> str | None:
        return self.s3_location(DVC_PREFIX)

    def s3_client_environment(self) -> dict[str, str]:
        """What MLflow's artifact store (boto3) and Prefect need to reach a non-AWS endpoint."""
        if not self.s3_endpoint_url:
            return {}
        return {"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url, "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url}

    def server_environment(self) -> dict[str, str]:
        """Variables for the stack's servers: Prefect's database, the S3 endpoint."""
        environment = self.s3_client_environment()
        if self.prefect_database_url:
            environment["PREFECT_API_DATABASE_CONNECTION_URL"] = self.prefect_database_url
        return environment

    def describe(self) -> str:
        """Where the stores are, for people: no password."""
        where = []
        if self.database_url:
            where.append(f"PostgreSQL postgresql://{_without_password(self.database_url)}")
        if self.s3_url:
            endpoint = f" at {self.s3_endpoint_url}" if self.s3_endpoint_url else ""
            where.append(f"S3 {self.s3_url}{endpoint}")
        return ", ".join(where) or "embedded (SQLite files and local folders)"


def _without_password(url: str | None) -> str:
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{user}{host}{port}"


def ensure_databases(stores: SharedStores) -> list[str]:
    """Create the stores' databases that do not exist yet; returns those created (idempotent)."""
    if not stores.database_url:
        return []
    import psycopg2

    created = []
    connection = psycopg2.connect(_with_database(stores.database_url, "postgres"))
    try:
        # CREATE DATABASE cannot run inside a transaction block.
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in (stores.database_prefix + database for database in DATABASES):
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
                    created.append(name)
    finally:
        connection.close()
    return created


def ensure_bucket(stores: SharedStores) -> bool:
    """Create the bucket when it does not exist; True if created now."""
    if not stores.bucket:
        return False
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=stores.s3_endpoint_url)
    try:
        client.head_bucket(Bucket=stores.bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket"}:
            raise
    client.create_bucket(Bucket=stores.bucket)
    return True
