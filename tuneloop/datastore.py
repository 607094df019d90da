"""Data versioning with DVC: put the raw data under DVC, configure a remote, push.

Each operation opens its own ``Repo``: a long-lived one breaks when the cache changes under it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.repo import Repo

from tuneloop.io import file_md5

log = logging.getLogger(__name__)

LOCAL_REMOTE_NAME = "tuneloop-local"


@dataclass(frozen=True)
class InitResult:
    created_dvc_repo: bool
    copied_sample: bool
    data_md5: str
    remote: str
    remote_url: str
    pushed_files: int


def ensure_dvc_repo(project_dir: Path) -> bool:
    """Make ``project_dir`` a DVC repo (inside git when it is a git work tree); True if created now."""
    if (project_dir / ".dvc").is_dir():
        return False
    Repo.init(str(project_dir), no_scm=not (project_dir / ".git").exists())
    return True


def ensure_default_remote(project_dir: Path, remote_url: str) -> tuple[str, str]:
    """Keep the user's default remote if there is one; else add a local-folder remote as default.

    The fallback goes into ``.dvc/config.local`` (not committed), since a folder path is machine-specific.
    """
    with Repo(str(project_dir)) as repo:
        default = repo.config["core"].get("remote")
        if default:
            return default, repo.config["remote"][default]["url"]
        Path(remote_url).mkdir(parents=True, exist_ok=True)
        with repo.config.edit("local") as config:
            config["remote"][LOCAL_REMOTE_NAME] = {"url": str(remote_url)}
            config["core"]["remote"] = LOCAL_REMOTE_NAME
    return LOCAL_REMOTE_NAME, str(remote_url)


def tracked_md5(pointer_path: Path) -> str | None:
    """The md5 a ``.dvc`` pointer file records for its single output, if the pointer exists."""
    if not pointer_path.exists():
        return None
    return yaml.safe_load(pointer_path.read_text(encoding="utf-8"))["outs"][0]["md5"]


def add_and_push(project_dir: Path, data_path: Path) -> int:
    """Track ``data_path`` with DVC and push it to the default remote; returns files pushed."""
    with Repo(str(project_dir)) as repo:
        repo.add(str(data_path))
    with Repo(str(project_dir)) as repo:
        return int(repo.push())


def init_project(project_dir: Path, sample_path: Path, raw_path: Path, remote_url: str) -> InitResult:
    """Idempotently: DVC repo, the sample copied to ``raw_path`` if no data is there, tracked, pushed."""
    project_dir = project_dir.resolve()
    created = ensure_dvc_repo(project_dir)
    raw = raw_path if raw_path.is_absolute() else project_dir / raw_path
    copied = False
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_path, raw)
        copied = True
        log.info("copied the sample dataset %s to %s", sample_path, raw)
    remote, url = ensure_default_remote(project_dir, remote_url)
    pushed = add_and_push(project_dir, raw.relative_to(project_dir))
    return InitResult(created, copied, file_md5(raw), remote, url, pushed)
