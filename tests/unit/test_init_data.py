"""`tuneloop init --data`: the checks that refuse a file with a precise message, the frozen test split,
the params.yaml write that keeps comments, and tracking a file that lives outside the project."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.support import REPO_ROOT, settings
from tuneloop.datastore import (
    DatasetRefused,
    check_dataset,
    init_dataset,
    split_frozen_test,
    write_data_params,
)
from tuneloop.io import file_md5, read_table


def _rows(per_label: int = 10, labels: str = "abc") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Utterance Text": [f"utterance {label} number {i}" for label in labels for i in range(per_label)],
            "Intent/Label": [f"label_{label}" for label in labels for _ in range(per_label)],
            "src channel": ["chat" if i % 2 else "email" for _ in labels for i in range(per_label)],
        }
    )


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    return path


def _check(data: Path, test: Path | None = None, groups=("src channel",)):
    return check_dataset(data, test, "Utterance Text", "Intent/Label", groups)


# ------------------------------------------------------------------------------- the frozen test split


def test_split_is_seeded_stratified_and_keeps_the_files_columns():
    frame = _rows(40)
    test = split_frozen_test(frame, "Utterance Text", "Intent/Label", 0.2, seed=7)
    assert list(test.columns) == list(frame.columns)
    assert len(test) == 24
    assert test["Intent/Label"].value_counts().to_dict() == {"label_a": 8, "label_b": 8, "label_c": 8}
    assert set(test["Utterance Text"]) <= set(frame["Utterance Text"])
    again = split_frozen_test(frame, "Utterance Text", "Intent/Label", 0.2, seed=7)
    assert again.equals(test)
    other = split_frozen_test(frame, "Utterance Text", "Intent/Label", 0.2, seed=8)
    assert set(other["Utterance Text"]) != set(test["Utterance Text"])


def test_split_draws_each_text_once_and_leaves_rare_labels_for_training():
    frame = _rows(20)
    dupes = frame.head(5).assign(**{"Utterance Text": lambda rows: rows["Utterance Text"].str.upper() + "?"})
    rare = pd.DataFrame({"Utterance Text": ["only one", "only two"], "Intent/Label": ["rare", "rare"]})
    test = split_frozen_test(
        pd.concat([frame, dupes, rare], ignore_index=True), "Utterance Text", "Intent/Label", 0.5, seed=1
    )
    folded = test["Utterance Text"].str.casefold().str.rstrip("?")
    assert not folded.duplicated().any()
    assert "rare" not in set(test["Intent/Label"])


def test_the_samples_frozen_test_file_is_exactly_the_seeded_split_of_the_sample():
    """The shipped file is what `split_frozen_test` draws with params.yaml's seed and fraction."""
    data, prepare = settings("data"), settings("prepare")
    sample = read_table(REPO_ROOT / "data/sample/intents.csv")
    drawn = split_frozen_test(
        sample, data.text_column, data.label_column, prepare.test_fraction, prepare.seed
    )
    shipped = read_table(REPO_ROOT / "data/sample/intents-test.csv")
    pd.testing.assert_frame_equal(drawn, shipped)
    pointer = yaml.safe_load((REPO_ROOT / "data/raw/intents-test.csv.dvc").read_text())
    assert pointer["outs"][0]["md5"] == file_md5(REPO_ROOT / "data/sample/intents-test.csv")
    assert data.test_path == "data/raw/intents-test.csv"


# ---------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_a_good_file_passes_in_every_format(tmp_path, suffix):
    checked = _check(_write(_rows(), tmp_path / f"data{suffix}"))
    assert checked.labels == ("label_a", "label_b", "label_c")
    assert len(checked.frame) == 30


@pytest.mark.parametrize(
    ("flag", "kwargs"),
    [
        ("--text-column 'utterance'", {"text_column": "utterance"}),
        ("--label-column 'intent'", {"label_column": "intent"}),
        ("--group-column 'channel'", {"group_columns": ("channel",)}),
    ],
)
def test_a_missing_column_is_named_with_its_flag_and_the_columns_there_are(tmp_path, flag, kwargs):
    data = _write(_rows(), tmp_path / "data.csv")
    arguments = {
        "text_column": "Utterance Text",
        "label_column": "Intent/Label",
        "group_columns": (),
        **kwargs,
    }
    with pytest.raises(DatasetRefused) as refused:
        check_dataset(data, None, **arguments)
    assert flag in str(refused.value)
    assert "'Utterance Text'" in str(refused.value)


def test_empty_texts_are_refused_with_their_line_numbers(tmp_path):
    frame = _rows()
    frame.loc[[3, 7], "Utterance Text"] = ["", "   "]
    with pytest.raises(DatasetRefused, match=r"2 rows have an empty text .*lines 5, 9"):
        _check(_write(frame, tmp_path / "data.csv"))


def test_missing_labels_are_refused(tmp_path):
    frame = _rows()
    frame.loc[4, "Intent/Label"] = ""
    with pytest.raises(DatasetRefused, match="1 rows have no label in column 'Intent/Label'"):
        _check(_write(frame, tmp_path / "data.csv"))


def test_a_single_label_is_refused(tmp_path):
    with pytest.raises(DatasetRefused, match="1 distinct label .*at least 2"):
        _check(_write(_rows(labels="a"), tmp_path / "data.csv"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.txt", "a,b\n", "unsupported extension '.txt'"),
        ("data.parquet", "not parquet", "could not be read as .parquet"),
        ("data.csv", "", "could not be read as .csv"),
        ("data.csv", "Utterance Text,Intent/Label,src channel\n", "has no rows"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetRefused, match=message):
        _check(path)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(DatasetRefused, match="does not exist"):
        _check(tmp_path / "nope.csv")


def test_the_test_file_needs_the_same_columns(tmp_path):
    data = _write(_rows(), tmp_path / "data.csv")
    test = _write(_rows(2).drop(columns=["src channel"]), tmp_path / "test.csv")
    with pytest.raises(DatasetRefused, match=r"test file .* lacks column\(s\) \['src channel'\]"):
        _check(data, test)


def test_the_test_file_may_only_have_labels_the_data_has(tmp_path):
    data = _write(_rows(labels="ab"), tmp_path / "data.csv")
    test = _write(_rows(2, labels="abz"), tmp_path / "test.csv")
    with pytest.raises(
        DatasetRefused, match=r"1 label\(s\) that the data file never has: 'label_z' \(2 rows\)"
    ):
        _check(data, test)


def test_a_good_test_file_passes(tmp_path):
    data = _write(_rows(), tmp_path / "data.csv")
    test = _write(_rows(2, labels="ab"), tmp_path / "test.jsonl")
    checked = _check(data, test)
    assert len(checked.test_frame) == 4


# ------------------------------------------------------------------------------------ params.yaml


def test_params_are_written_keeping_comments_and_everything_else(tmp_path):
    params = tmp_path / "params.yaml"
    original = (REPO_ROOT / "params.yaml").read_text()
    params.write_text(original)
    values = {
        "raw_path": "data/raw/my data.csv",
        "test_path": "data/raw/my data-test.csv",
        "text_column": "Utterance: Text",
        "label_column": "Intent/Label",
        "group_columns": ["on"],
        "labels": ["label_a", "yes", "1", "null"],
    }
    changed = write_data_params(params, values)
    assert changed == list(values)
    written = params.read_text()
    kept = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert kept and all(line in written.splitlines() for line in kept)
    # Everything after the data section is byte for byte the same (the blank line before it too).
    assert written[written.index("\n\nprepare:") :] == original[original.index("\n\nprepare:") :]
    # YAML 1.1 readers (PyYAML, what load_params uses) read every value back as the same string.
    assert yaml.safe_load(written)["data"] == values
    assert write_data_params(params, values) == []
    assert params.read_text() == written


# ---------------------------------------------------------------- a file outside the project


def _git_project(root: Path) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_outside_data_gets_a_dvc_tracked_copy_that_records_its_origin_and_never_enters_git(tmp_path):
    project = _git_project(tmp_path / "project")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = _write(_rows(20), outside / "train set.csv")
    result = init_dataset(
        project,
        project / "params.yaml",
        data,
        None,
        "Utterance Text",
        "Intent/Label",
        ("src channel",),
        str(tmp_path / "remote"),
    )
    pointer = yaml.safe_load((project / "data/raw/train set.csv.dvc").read_text())
    assert pointer["deps"][0]["path"] == str(data)
    assert pointer["outs"][0]["md5"] == file_md5(data) == result.data.md5
    assert (project / "data/raw/train set.csv").read_bytes() == data.read_bytes()
    test = read_table(project / "data/raw/train set-test.csv")
    assert len(test) == result.test_rows == 9
    assert (project / "data/raw/train set-test.csv.dvc").exists()
    gitignore = (project / "data/raw/.gitignore").read_text().splitlines()
    assert {"/train set.csv", "/train set-test.csv"} <= set(gitignore)
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "train set.csv\n" not in untracked and "train set-test.csv\n" not in untracked
    params = yaml.safe_load((project / "params.yaml").read_text())["data"]
    assert params["raw_path"] == "data/raw/train set.csv"
    assert params["test_path"] == "data/raw/train set-test.csv"
    assert params["labels"] == ["label_a", "label_b", "label_c"]
    assert params["group_columns"] == ["src channel"]
    assert result.pushed_files == 2
    summary = result.summary()
    for expected in [
        "60 rows",
        "3 labels",
        "Utterance Text -> text",
        str(data),
        result.data.md5,
        "tuneloop run",
    ]:
        assert expected in summary

    # Again with the same file: nothing changes, nothing is pushed, the frozen test set is kept.
    before = {p.name: p.read_bytes() for p in (project / "data/raw").iterdir()}
    again = init_dataset(
        project,
        project / "params.yaml",
        data,
        None,
        "Utterance Text",
        "Intent/Label",
        ("src channel",),
        str(tmp_path / "remote"),
    )
    assert again.pushed_files == 0 and again.params_changed == []
    assert {p.name: p.read_bytes() for p in (project / "data/raw").iterdir()} == before
    assert "kept the existing frozen test file" in again.summary()


def test_another_file_with_the_same_name_is_refused_not_overwritten(tmp_path):
    project = _git_project(tmp_path / "project")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    arguments = ("Utterance Text", "Intent/Label", (), str(tmp_path / "remote"))
    init_dataset(project, project / "params.yaml", _write(_rows(), first / "data.csv"), None, *arguments)
    with pytest.raises(DatasetRefused, match="already tracks"):
        init_dataset(project, project / "params.yaml", _write(_rows(), second / "data.csv"), None, *arguments)


def test_feedback_appended_to_an_imported_copy_is_committed_keeping_its_origin(tmp_path):
    """What the drift monitor does (append rows, then add_and_push) works on outside data too."""
    from tuneloop.datastore import add_and_push, tracked_md5

    project = _git_project(tmp_path / "project")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = _write(_rows(20), outside / "data.csv")
    arguments = ("Utterance Text", "Intent/Label", (), str(tmp_path / "remote"))
    init_dataset(project, project / "params.yaml", data, None, *arguments)
    copy = project / "data/raw/data.csv"
    test_before = (project / "data/raw/data-test.csv").read_bytes()
    grown = pd.concat([read_table(copy), _rows(25).tail(5)], ignore_index=True)
    grown.to_csv(copy, index=False)
    assert add_and_push(project, [copy]) == 1
    pointer = yaml.safe_load((project / "data/raw/data.csv.dvc").read_text())
    assert pointer["deps"][0]["path"] == str(data)
    assert tracked_md5(project / "data/raw/data.csv.dvc") == file_md5(copy) != file_md5(data)
    assert (project / "data/raw/data-test.csv").read_bytes() == test_before
    status = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "dvc"), "status", "-q"], cwd=project, check=False
    )
    assert status.returncode == 0, "the pointer must be consistent (no 'changed checksum')"


# ---------------------------------------------------------------- `tuneloop init` (the sample)


def _sample_project(root: Path) -> Path:
    project = _git_project(root)
    (project / "data/sample").mkdir(parents=True)
    for name in ("intents.csv", "intents-test.csv"):
        (project / "data/sample" / name).write_bytes((REPO_ROOT / "data/sample" / name).read_bytes())
    return project


def _init_sample(project: Path, remote: Path):
    from tuneloop.datastore import init_project

    return init_project(
        project, project / "data/sample/intents.csv", Path("data/raw/intents.csv"), str(remote)
    )


def test_init_puts_the_shipped_frozen_test_file_in_place_and_never_redraws_it(tmp_path):
    project = _sample_project(tmp_path / "project")
    # A fresh clone: the committed pointers are here, the data is not, the remote is empty.
    (project / "data/raw").mkdir()
    for name in ("intents.csv.dvc", "intents-test.csv.dvc"):
        (project / "data/raw" / name).write_bytes((REPO_ROOT / "data/raw" / name).read_bytes())
    result = _init_sample(project, tmp_path / "remote")
    frozen = project / "data/raw/intents-test.csv"
    assert result.test_path == "data/raw/intents-test.csv"
    assert result.test_source == "copied from the sample"
    assert frozen.read_bytes() == (REPO_ROOT / "data/sample/intents-test.csv").read_bytes()
    assert (project / "data/raw/intents-test.csv.dvc").read_bytes() == (
        REPO_ROOT / "data/raw/intents-test.csv.dvc"
    ).read_bytes()
    assert result.pushed_files == 2

    # The raw data grows (feedback); the frozen file stays, and a lost copy comes back from the remote.
    raw = project / "data/raw/intents.csv"
    raw.write_text(raw.read_text() + "where is my parcel now,check_order_status,chat\n")
    assert _init_sample(project, tmp_path / "remote").test_source == "kept"
    frozen.unlink()
    again = _init_sample(project, tmp_path / "remote")
    assert again.test_source == "restored from the DVC remote"
    assert frozen.read_bytes() == (REPO_ROOT / "data/sample/intents-test.csv").read_bytes()


def test_init_splits_a_test_file_off_other_raw_data_once(tmp_path):
    project = _sample_project(tmp_path / "project")
    raw = project / "data/raw/intents.csv"
    raw.parent.mkdir(parents=True)
    sample = read_table(project / "data/sample/intents.csv")
    sample.iloc[::2].to_csv(raw, index=False)
    result = _init_sample(project, tmp_path / "remote")
    assert result.test_source == "split off the raw data"
    test = read_table(project / "data/raw/intents-test.csv")
    assert set(test["text"]) <= set(sample.iloc[::2]["text"])
    assert len(test) == pytest.approx(0.15 * len(sample) / 2, abs=1)


def test_init_refuses_to_put_other_data_where_a_pointer_says_otherwise(tmp_path):
    project = _sample_project(tmp_path / "project")
    (project / "data/raw").mkdir()
    (project / "data/raw/intents-test.csv.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef\n  size: 1\n  hash: md5\n  path: intents-test.csv\n"
    )
    with pytest.raises(RuntimeError, match="neither here nor in the DVC remote"):
        _init_sample(project, tmp_path / "remote")
    assert not (project / "data/raw/intents-test.csv").exists()
