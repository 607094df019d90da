"""`tuneloop init --data` with a user's own files (outside the project, odd column names), then
`tuneloop run --skip-init` to an evaluated model, in a fresh copy of the repo with the tiny model.

Real DVC (import-url, local remote, stages), real GX, real training.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.support import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

TEXT, LABEL, GROUP = "Customer Message (raw)", "Intent: Name", "Source Channel"
PHRASES = {
    "card lost": ["I lost my card", "my card is gone", "cannot find my bank card", "card went missing"],
    "refund-please": ["I want my money back", "please refund me", "refund the order", "give me a refund"],
    "open_hours": ["when are you open", "what time do you close", "opening hours today", "are you open now"],
}
ENDINGS = ["", " please", " thanks", " asap", " today", " urgently", " again", " now"]


def _rows(start: int, per_label: int, seed: int) -> pd.DataFrame:
    """Distinct texts per label (each carries its own number), channels alternating."""
    rng = random.Random(seed)
    rows = []
    for label, phrases in PHRASES.items():
        for i in range(start, start + per_label):
            text = f"{rng.choice(phrases)} ref {i}{rng.choice(ENDINGS)}"
            rows.append({TEXT: text, LABEL: label, GROUP: "email" if i % 2 else "chat", "Note": "x"})
    return pd.DataFrame(rows)


def _comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


@pytest.fixture
def user_files(tmp_path) -> tuple[Path, Path]:
    """The user's data and test files, outside the project."""
    outside = tmp_path / "user data"
    outside.mkdir()
    data = outside / "tickets 2026.csv"
    _rows(0, 45, seed=1).to_csv(data, index=False)
    test = outside / "held-out.csv"
    _rows(1000, 12, seed=2).to_csv(test, index=False)
    return data, test


def _init(project: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        "tuneloop",
        "init",
        "--data",
        str(data),
        "--text-column",
        TEXT,
        "--label-column",
        LABEL,
        "--group-column",
        GROUP,
        *extra,
        cwd=project,
    )


def test_init_with_own_data_then_run_to_an_evaluated_model_with_a_frozen_test_set(project, user_files):
    data, test = user_files
    params_before = (project / "params.yaml").read_text()

    init = _init(project, data, "--test", str(test))
    assert init.returncode == 0, init.stdout + init.stderr
    for expected in ["135 rows", "3 labels", f"{TEXT} -> text", "data/raw/tickets 2026.csv", "tuneloop run"]:
        assert expected in init.stdout, init.stdout

    params_after = (project / "params.yaml").read_text()
    assert _comment_lines(params_after) == _comment_lines(params_before)
    written = yaml.safe_load(params_after)["data"]
    assert written["labels"] == ["card lost", "open_hours", "refund-please"]
    assert written["text_column"] == TEXT and written["label_column"] == LABEL
    assert written["group_columns"] == [GROUP]
    assert written["raw_path"] == "data/raw/tickets 2026.csv"
    assert written["test_path"] == "data/raw/held-out.csv"
    pointer = yaml.safe_load((project / "data/raw/tickets 2026.csv.dvc").read_text())
    assert pointer["deps"][0]["path"] == str(data), "the pointer records where the data came from"
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=project, capture_output=True, text=True
    ).stdout
    assert "tickets 2026.csv.dvc" in status and "held-out.csv.dvc" in status
    # git sees the pointers, never the data (data/raw/.gitignore lists the copies).
    assert not [line for line in status.splitlines() if line.rstrip('"').endswith(".csv")], status

    again = _init(project, data, "--test", str(test))
    assert again.returncode == 0, again.stderr
    assert "0 file(s) pushed" in again.stdout and "already up to date" in again.stdout
    assert (project / "params.yaml").read_text() == params_after

    run = run_cli("tuneloop", "run", "--skip-init", cwd=project)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["quality/accuracy"] <= 1
    prepared_test = pd.read_parquet(project / "data/prepared/test.parquet")
    assert len(prepared_test) == 36
    assert set(prepared_test["label"]) == set(PHRASES)

    # The frozen promise: feedback appended to the raw data changes train/val, never the test split.
    raw = project / "data/raw/tickets 2026.csv"
    pd.concat([pd.read_csv(raw, dtype=str), _rows(500, 5, seed=3)]).to_csv(raw, index=False)
    rerun = run_cli("dvc", "repro", "prepare", cwd=project)
    assert rerun.returncode == 0, rerun.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(project / "data/prepared/test.parquet"), prepared_test)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["rows"]["train"] + meta["rows"]["val"] == 135 + 15


def test_without_a_test_file_one_is_split_off_once_and_kept(project, user_files):
    data, _ = user_files
    init = _init(project, data)
    assert init.returncode == 0, init.stdout + init.stderr
    frozen = project / "data/raw/tickets 2026-test.csv"
    first = frozen.read_bytes()
    assert len(pd.read_csv(frozen)) == 21  # 15% of 45 rows per label, stratified
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["test_path"] == (
        "data/raw/tickets 2026-test.csv"
    )
    again = _init(project, data)
    assert again.returncode == 0 and "kept the existing frozen test file" in again.stdout
    assert frozen.read_bytes() == first


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--label-column", "Intent", "--label-column 'Intent'"),
        ("--text-column", "message", "--text-column 'message'"),
    ],
)
def test_a_missing_column_is_refused_with_exit_2_naming_it(project, user_files, flag, value, named):
    data, _ = user_files
    params_before = (project / "params.yaml").read_text()
    arguments = {"--text-column": TEXT, "--label-column": LABEL, flag: value}
    result = run_cli(
        "tuneloop",
        "init",
        "--data",
        str(data),
        *[word for pair in arguments.items() for word in pair],
        cwd=project,
    )
    assert result.returncode == 2
    assert named in result.stderr and TEXT in result.stderr, result.stderr
    assert (project / "params.yaml").read_text() == params_before
    assert not list(project.glob("data/raw/tickets*"))


def test_a_test_file_with_an_unknown_label_is_refused(project, user_files, tmp_path):
    data, test = user_files
    bad = tmp_path / "bad-test.csv"
    frame = pd.read_csv(test)
    frame.loc[:2, LABEL] = "close account"
    frame.to_csv(bad, index=False)
    params_before = (project / "params.yaml").read_text()
    result = _init(project, data, "--test", str(bad))
    assert result.returncode == 2
    assert "'close account' (3 rows)" in result.stderr, result.stderr
    assert (project / "params.yaml").read_text() == params_before


def test_the_repo_never_holds_a_copy_of_banking77():
    """Outside data is DVC-tracked under data/raw/ in a user's project, never committed to this repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert not [
        name for name in listed if "banking77" in name.lower() and name.endswith((".csv", ".parquet"))
    ]
