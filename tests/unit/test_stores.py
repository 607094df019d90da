"""One switch of environment variables moves every store; wrong values fail at start-up, by name."""

from __future__ import annotations

import pytest
from dvc.repo import Repo

from tuneloop.config import Environment
from tuneloop.datastore import LOCAL_REMOTE_NAME, ensure_default_remote
from tuneloop.stores import SharedStores

SERVER = "postgresql://team:s3cret@db.internal:5432"


def test_each_store_gets_its_own_database_and_prefix() -> None:
    stores = SharedStores(SERVER + "/ignored", "s3://ml-bucket/tuneloop/", "http://minio:9000", "staging_")
    assert stores.mlflow_backend_store_uri == f"{SERVER}/staging_mlflow"
    assert stores.mlflow_auth_database_uri == f"{SERVER}/staging_mlflow_auth"
    assert stores.prefect_database_url == "postgresql+asyncpg://team:s3cret@db.internal:5432/staging_prefect"
    assert (
        stores.inference_log_url == "postgresql+psycopg2://team:s3cret@db.internal:5432/staging_inference_log"
    )
    assert stores.mlflow_artifacts_destination == "s3://ml-bucket/tuneloop/mlartifacts"
    assert stores.dvc_remote_url == "s3://ml-bucket/tuneloop/dvc"
    assert stores.bucket == "ml-bucket"
    assert stores.server_environment() == {
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
        "PREFECT_API_DATABASE_CONNECTION_URL": stores.prefect_database_url,
    }
    assert "s3cret" not in stores.describe() and "db.internal:5432" in stores.describe()


def test_embedded_stores_derive_nothing() -> None:
    stores = SharedStores(None, None)
    assert stores.mlflow_backend_store_uri is None and stores.dvc_remote_url is None
    assert stores.server_environment() == {} and stores.describe().startswith("embedded")


@pytest.mark.parametrize(
    ("database_url", "s3_url", "prefix", "says"),
    [
        ("mysql://db:3306", None, "", "TUNELOOP_DATABASE_URL"),
        ("sqlite:///x.db", None, "", "TUNELOOP_DATABASE_URL"),
        (None, "https://bucket.example.com", "", "TUNELOOP_S3_URL"),
        (None, "s3://", "", "TUNELOOP_S3_URL"),
        (SERVER, None, "drop table;", "TUNELOOP_DATABASE_PREFIX"),
    ],
)
def test_a_wrong_store_setting_is_refused_by_name(database_url, s3_url, prefix, says) -> None:
    with pytest.raises(ValueError, match=says):
        SharedStores(database_url, s3_url, None, prefix)


def test_environment_derives_the_log_and_remote_and_explicit_values_win(monkeypatch, tmp_path) -> None:
    for name in ("TUNELOOP_INFERENCE_LOG_URL", "TUNELOOP_DVC_REMOTE", "TUNELOOP_DATABASE_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", SERVER)
    monkeypatch.setenv("TUNELOOP_S3_URL", "s3://ml-bucket/team")
    monkeypatch.setenv("TUNELOOP_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = Environment.from_env(tmp_path)
    assert env.inference_log_url == f"postgresql+psycopg2://{SERVER.split('://')[1]}/inference_log"
    assert env.dvc_remote_url == "s3://ml-bucket/team/dvc"
    assert env.stores.mlflow_backend_store_uri == f"{SERVER}/mlflow"
    assert "s3cret" not in repr(env.database_url)
    monkeypatch.setenv("TUNELOOP_DVC_REMOTE", str(tmp_path / "remote"))
    monkeypatch.setenv("TUNELOOP_INFERENCE_LOG_URL", "sqlite:///log.db")
    env = Environment.from_env(tmp_path)
    assert (env.dvc_remote_url, env.inference_log_url) == (str(tmp_path / "remote"), "sqlite:///log.db")


def test_environment_refuses_a_wrong_url_at_start_up(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", "mysql://db")
    with pytest.raises(ValueError, match="TUNELOOP_DATABASE_URL"):
        Environment.from_env(tmp_path)


def test_tuneloops_own_remote_follows_the_stores_and_a_users_remote_is_kept(tmp_path) -> None:
    Repo.init(str(tmp_path), no_scm=True)
    assert ensure_default_remote(tmp_path, str(tmp_path / "folder")) == (
        LOCAL_REMOTE_NAME,
        str(tmp_path / "folder"),
    )
    assert (tmp_path / "folder").is_dir()
    ensure_default_remote(tmp_path, "s3://ml-bucket/team/dvc", "http://127.0.0.1:9000")
    local = (tmp_path / ".dvc/config.local").read_text()
    assert "s3://ml-bucket/team/dvc" in local and "endpointurl = http://127.0.0.1:9000" in local
    assert not (tmp_path / "s3:").exists()
    with Repo(str(tmp_path)) as repo, repo.config.edit("repo") as config:
        config["remote"]["team"] = {"url": "s3://their-bucket/dvc"}
        config["core"]["remote"] = "team"
    (tmp_path / ".dvc/config.local").unlink()
    assert ensure_default_remote(tmp_path, "s3://ml-bucket/team/dvc") == ("team", "s3://their-bucket/dvc")


def test_a_data_version_travels_as_its_pointer_and_bad_pointers_write_nothing(tmp_path) -> None:
    from tuneloop.commands import write_pointers

    pointer = "outs:\n- md5: 0123456789abcdef0123456789abcdef\n  size: 10\n  path: intents.csv\n"
    assert write_pointers(tmp_path, {"data/raw/intents.csv.dvc": pointer}) == ["data/raw/intents.csv.dvc"]
    assert (tmp_path / "data/raw/intents.csv.dvc").read_text() == pointer
    for bad in (
        {"../outside.csv.dvc": pointer},
        {"data/raw/intents.csv": pointer},
        {".dvc/config.dvc": pointer},
        {"data/raw/other.csv.dvc": "outs:\n- path: other.csv\n"},
        {"data/raw/ok.csv.dvc": pointer, "data/raw/empty.csv.dvc": ""},
    ):
        with pytest.raises(ValueError, match="data pointer"):
            write_pointers(tmp_path, bad)
    assert (
        not (tmp_path / "data/raw/ok.csv.dvc").exists() and not (tmp_path.parent / "outside.csv.dvc").exists()
    )
