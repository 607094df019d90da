"""Lineage and committed data versions, on throwaway git repos (real git and DVC, no model).

`tuneloop.tracking.git_commit` is the commit a run's inputs are at, `-dirty` only when a tracked
input differs from it, not when the pipeline rewrites its own outputs. `commit_data_version` commits
a data version's pointer and nothing else, on the current or a configured branch, or refuses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.repo import Repo

from tuneloop.datastore import (
    FALLBACK_GIT_EMAIL,
    FALLBACK_GIT_NAME,
    DataCommitRefused,
    check_data_commit,
    commit_data_version,
)
from tuneloop.tracking import git_commit, pipeline_outputs

POINTER = "data/raw/intents.csv.dvc"
# A stage that records the lineage it sees while `dvc repro` runs it: its output, metrics and plot are
# tracked by git, as dvc.lock is (as in this repository).
DVC_YAML = f"""stages:
  record:
    cmd: {sys.executable} record.py
    deps: [record.py]
    params: [record.factor]
    outs: [out]
    metrics:
      - metrics/lineage.json:
          cache: false
    plots:
      - plots/history.csv:
          cache: false
"""
RECORD_PY = """import json, pathlib
from tuneloop.tracking import git_commit
lineage = git_commit(pathlib.Path("."))
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/model.txt").write_text("weights")
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/lineage.json").write_text(json.dumps({"lineage": lineage}))
pathlib.Path("plots").mkdir(exist_ok=True)
pathlib.Path("plots/history.csv").write_text("epoch,loss\\n1,0.5\\n")
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def status(repo: Path) -> set[str]:
    """`git status --porcelain` lines, as a set (their order is by path)."""
    out = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
    )
    return set(out.stdout.splitlines())


@pytest.fixture
def no_identity(tmp_path, monkeypatch):
    """git with no user.name/user.email anywhere (global and system config hidden)."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for variable in ("NAME", "EMAIL"):
        for who in ("AUTHOR", "COMMITTER"):
            monkeypatch.delenv(f"GIT_{who}_{variable}", raising=False)


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def data_repo(tmp_path) -> Path:
    """A git repo with a data pointer, code and a README committed on `main`."""
    repo = tmp_path / "repo"
    (repo / "data/raw").mkdir(parents=True)
    (repo / POINTER).write_text("outs:\n- md5: aaaa\n  path: intents.csv\n")
    (repo / "data/raw/.gitignore").write_text("/intents.csv\n")
    (repo / "train.py").write_text("print('train')\n")
    (repo / "README.md").write_text("readme\n")
    git(repo, "init", "-q", "-b", "main")
    commit_all(repo, "start")
    return repo


def new_data_version(repo: Path, md5: str = "bbbb") -> None:
    (repo / POINTER).write_text(f"outs:\n- md5: {md5}\n  path: intents.csv\n")


def changed_in(repo: Path, rev: str) -> list[str]:
    return git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", rev).splitlines()


# -------------------------------------------------------------------------------------------- lineage


@pytest.fixture(scope="module")
def pipeline_template(tmp_path_factory) -> Path:
    """A git + DVC project with a one-stage pipeline, run once and committed with its outputs."""
    repo = tmp_path_factory.mktemp("template") / "pipeline"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    Repo.init(str(repo))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("record:\n  factor: 1\n")
    (repo / "record.py").write_text(RECORD_PY)
    (repo / ".gitignore").write_text("/out\n")
    (repo / "data").mkdir()
    (repo / "data/input.csv.dvc").write_text("outs:\n- md5: aaaa\n  path: input.csv\n")
    repro(repo)
    commit_all(repo, "pipeline and its outputs")
    return repo


@pytest.fixture
def pipeline_repo(pipeline_template, tmp_path) -> Path:
    return Path(shutil.copytree(pipeline_template, tmp_path / "pipeline", symlinks=True))


def repro(repo: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *args], cwd=repo, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return (repo / "metrics/lineage.json").read_text()


def test_pipeline_outputs_are_the_stage_outputs_and_dvc_lock(pipeline_repo):
    outputs = pipeline_outputs(pipeline_repo)
    assert outputs == ("dvc.lock", "metrics/lineage.json", "out", "plots/history.csv")
    assert "data/input.csv.dvc" not in outputs  # a pointer names input data
    assert pipeline_outputs(pipeline_repo.parent) == ()  # no DVC project: no outputs


def test_outputs_rewritten_by_the_pipeline_keep_the_lineage_clean(pipeline_repo):
    head = git(pipeline_repo, "rev-parse", "HEAD")
    (pipeline_repo / "metrics/lineage.json").write_text("{}")
    (pipeline_repo / "plots/history.csv").unlink()
    (pipeline_repo / "dvc.lock").write_text("schema: '2.0'\n")
    (pipeline_repo / "notes.txt").write_text("untracked: not an input")
    assert git_commit(pipeline_repo) == head


@pytest.mark.parametrize(
    "edit",
    [
        lambda repo: (repo / "params.yaml").write_text("record:\n  factor: 2\n"),
        lambda repo: (repo / "record.py").write_text(RECORD_PY + "# changed\n"),
        lambda repo: (repo / "data/input.csv.dvc").write_text("outs:\n- md5: bbbb\n  path: input.csv\n"),
        lambda repo: (repo / "dvc.yaml").write_text(DVC_YAML.replace("out]", "out2]")),
    ],
    ids=["params", "code", "data pointer", "pipeline definition"],
)
def test_a_changed_input_makes_the_lineage_dirty(pipeline_repo, edit):
    head = git(pipeline_repo, "rev-parse", "HEAD")
    edit(pipeline_repo)
    assert git_commit(pipeline_repo) == f"{head}-dirty"
    git(pipeline_repo, "add", "-A")  # staged or not
    assert git_commit(pipeline_repo) == f"{head}-dirty"


def test_a_stage_sees_a_clean_lineage_while_dvc_repro_replaces_its_outputs(pipeline_repo):
    """DVC deletes a stage's outputs before running it and rewrites dvc.lock after: neither is an input."""
    head = git(pipeline_repo, "rev-parse", "HEAD")
    assert repro(pipeline_repo, "--force") == f'{{"lineage": "{head}"}}'
    (pipeline_repo / "params.yaml").write_text("record:\n  factor: 3\n")
    assert f"{head}-dirty" in repro(pipeline_repo)


def test_lineage_outside_git_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"


# ------------------------------------------------------------------------------------- data commits


def test_the_data_commit_holds_the_pointer_only_with_the_message(data_repo):
    start = git(data_repo, "rev-parse", "HEAD")
    new_data_version(data_repo)
    (data_repo / "train.py").write_text("print('half-way through an edit')\n")
    (data_repo / "scratch.txt").write_text("untracked")

    commit = commit_data_version(data_repo, [POINTER], "drift monitor appended 3 rows\n\nbody\n")

    assert commit is not None and commit.branch == "main" and commit.paths == (POINTER,)
    assert (
        git(data_repo, "rev-parse", "HEAD") == commit.sha and git(data_repo, "rev-parse", "HEAD~1") == start
    )
    assert changed_in(data_repo, commit.sha) == [POINTER]
    assert git(data_repo, "log", "-1", "--format=%s") == "drift monitor appended 3 rows"
    # The other edit and the untracked file are left as they were, nothing is staged.
    assert status(data_repo) == {" M train.py", "?? scratch.txt"}
    assert commit_data_version(data_repo, [POINTER], "again") is None  # nothing left to commit


def test_a_configured_identity_is_used_else_the_fallback(data_repo, no_identity):
    new_data_version(data_repo, "bbbb")
    commit_data_version(data_repo, [POINTER], "fallback identity")
    assert git(data_repo, "log", "-1", "--format=%an <%ae> / %cn <%ce>") == (
        f"{FALLBACK_GIT_NAME} <{FALLBACK_GIT_EMAIL}> / {FALLBACK_GIT_NAME} <{FALLBACK_GIT_EMAIL}>"
    )
    git(data_repo, "config", "user.name", "Data Steward")
    git(data_repo, "config", "user.email", "steward@example.org")
    new_data_version(data_repo, "cccc")
    commit_data_version(data_repo, [POINTER], "configured identity")
    assert git(data_repo, "log", "-1", "--format=%cn <%ce>") == "Data Steward <steward@example.org>"


def test_other_staged_changes_refuse_the_commit_and_change_nothing(data_repo):
    start = git(data_repo, "rev-parse", "HEAD")
    (data_repo / "train.py").write_text("print('staged by someone')\n")
    git(data_repo, "add", "train.py")
    with pytest.raises(DataCommitRefused, match=r"other changes are staged \(train.py\)"):
        check_data_commit(data_repo, [POINTER])
    new_data_version(data_repo)
    with pytest.raises(DataCommitRefused):
        commit_data_version(data_repo, [POINTER], "x")
    assert git(data_repo, "rev-parse", "HEAD") == start
    assert status(data_repo) == {"M  train.py", f" M {POINTER}"}
    # A staged pointer is the data version's own: that is allowed.
    git(data_repo, "restore", "--staged", "train.py")
    git(data_repo, "add", POINTER)
    assert check_data_commit(data_repo, [POINTER]) == "main"


def test_a_detached_head_or_an_unfinished_merge_refuses(data_repo):
    git(data_repo, "checkout", "-q", "--detach")
    with pytest.raises(DataCommitRefused, match="HEAD is detached"):
        check_data_commit(data_repo, [POINTER])
    git(data_repo, "checkout", "-q", "main")
    (data_repo / ".git/MERGE_HEAD").write_text(git(data_repo, "rev-parse", "HEAD") + "\n")
    with pytest.raises(DataCommitRefused, match="in progress"):
        check_data_commit(data_repo, [POINTER], "data")


def test_a_named_branch_gets_the_commit_and_the_work_tree_stays_as_it_is(data_repo):
    start = git(data_repo, "rev-parse", "HEAD")
    new_data_version(data_repo)
    (data_repo / "README.md").write_text("staged by someone else\n")
    git(data_repo, "add", "README.md")  # the index is not touched on another branch: no refusal

    first = commit_data_version(data_repo, [POINTER], "data version 1", branch="data")

    assert first is not None and first.branch == "data"
    assert git(data_repo, "rev-parse", "data") == first.sha and git(data_repo, "rev-parse", "data~1") == start
    assert changed_in(data_repo, first.sha) == [POINTER]
    assert git(data_repo, "show", f"{first.sha}:{POINTER}") == (data_repo / POINTER).read_text().strip()
    assert git(data_repo, "rev-parse", "HEAD") == start
    assert status(data_repo) == {"M  README.md", f" M {POINTER}"}

    new_data_version(data_repo, "cccc")
    second = commit_data_version(data_repo, [POINTER], "data version 2", branch="data")
    assert second is not None and git(data_repo, "rev-parse", "data~1") == first.sha
    assert commit_data_version(data_repo, [POINTER], "unchanged", branch="data") is None
    with pytest.raises(DataCommitRefused, match="not a valid git branch name"):
        check_data_commit(data_repo, [POINTER], "bad..name")


def test_naming_the_checked_out_branch_is_an_ordinary_commit(data_repo):
    new_data_version(data_repo)
    commit = commit_data_version(data_repo, [POINTER], "on main by name", branch="main")
    assert commit is not None and git(data_repo, "rev-parse", "HEAD") == commit.sha
    assert status(data_repo) == set()


def test_outside_git_nothing_is_committed(tmp_path):
    (tmp_path / "x.dvc").write_text("outs: []\n")
    assert check_data_commit(tmp_path, ["x.dvc"]) is None
    assert commit_data_version(tmp_path, ["x.dvc"], "message") is None
