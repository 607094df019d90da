"""Users and roles on an MLflow tracking server that runs `--app-name tuneloop`.

The four roles are MLflow RBAC roles (``tuneloop-<role>`` in the default workspace) that grant
MLflow's own permissions; the server's promotion rules (``registry.server_rules``) read the same
role names. Passwords are passed in by the caller (from a file or the environment), never stored here.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

from registry.server_rules import APPROVER, DEPLOYER, TRAINER, VIEWER, role_name

log = logging.getLogger(__name__)

# MLflow permissions each role needs; the promotion rules narrow EDIT/MANAGE further on the server.
ROLE_PERMISSIONS: dict[str, tuple[tuple[str, str], ...]] = {
    # Logs runs, registers versions, sets `dev`.
    TRAINER: (("experiment", "EDIT"), ("registered_model", "EDIT")),
    # Reads everything, sets the version tag `approval` (people, in the MLflow UI).
    APPROVER: (("experiment", "READ"), ("registered_model", "EDIT")),
    # Moves `prod` / `previous-prod` (deleting an alias is MANAGE in MLflow).
    DEPLOYER: (("experiment", "READ"), ("registered_model", "MANAGE")),
    VIEWER: (("experiment", "READ"), ("registered_model", "READ")),
}
ROLES = tuple(ROLE_PERMISSIONS)
MIN_PASSWORD_CHARS = 12


@dataclass(frozen=True)
class UserGrant:
    username: str
    roles: tuple[str, ...]
    created: bool


def ensure_roles(client: AuthServiceClient) -> dict[str, int]:
    """Create the tuneloop roles that do not exist yet; return every role's id by tuneloop role name."""
    existing = {role.name: role.id for role in client.list_roles(DEFAULT_WORKSPACE_NAME)}
    ids = {}
    for role, permissions in ROLE_PERMISSIONS.items():
        name = role_name(role)
        if name not in existing:
            created = client.create_role(DEFAULT_WORKSPACE_NAME, name, description=f"tuneloop {role}")
            for resource_type, permission in permissions:
                client.add_role_permission(created.id, resource_type, "*", permission)
            existing[name] = created.id
            log.info("created role %s", name)
        ids[role] = existing[name]
    return ids


def add_user(client: AuthServiceClient, username: str, password: str, roles: list[str]) -> UserGrant:
    """Create ``username`` (unless it exists) and give it ``roles``; an existing password is kept."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; choose from {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    role_ids = ensure_roles(client)
    created = True
    try:
        client.create_user(username, password)
    except (MlflowException, RestException) as error:
        if "already exists" not in str(error).lower():
            raise
        created = False
    held = {role.name for role in client.list_user_roles(username)}
    for role in roles:
        if role_name(role) not in held:
            client.assign_role(username, role_ids[role])
    return UserGrant(username, tuple(sorted(roles)), created)


def user_roles(client: AuthServiceClient, username: str) -> list[str]:
    from registry.server_rules import tuneloop_roles

    return sorted(tuneloop_roles([role.name for role in client.list_user_roles(username)]))


def read_password(path: Path | None, from_env: str | None) -> str:
    """A password from a file (first line) or an environment value; never from the command line."""
    if path is not None:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    if from_env:
        return from_env
    raise ValueError("give the password in a file (--password-file) or in TUNELOOP_NEW_USER_PASSWORD")


def generated_password(path: Path) -> str:
    """The password stored at ``path`` (mode 0600), generated on first use: for service identities."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(password, encoding="utf-8")
    return password


ADMIN_USERNAME = "admin"
AUTH_APP_NAME = "tuneloop"


def auth_server_environment(
    folder: Path, admin_password: str, secret_key: str, database_uri: str | None = None
) -> dict[str, str]:
    """What `mlflow server --app-name tuneloop` needs: its auth config file (written here), admin, secret.

    Users, passwords and roles live in ``database_uri`` (default: SQLite in ``folder``); nobody gets
    any permission by default: every identity acts through its roles.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mlflow-auth.ini"
    users_db = database_uri or f"sqlite:///{folder / 'mlflow-auth.db'}"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {users_db}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
    }


def auth_server_command(python: str, backend_store_uri: str, artifacts: Path | str, port: int) -> list[str]:
    """`mlflow server --app-name tuneloop` on loopback: one worker process (see registry/server.py).

    ``artifacts`` is a folder or an object store URL (``s3://bucket/prefix``); clients reach it only
    through the server's artifact proxy, so only the server holds the store's credentials.
    """
    return [
        python,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        AUTH_APP_NAME,
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
