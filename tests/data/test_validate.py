"""The data-check suite, run for real with Great Expectations on the prepared sample.

Each corruption a user could ship must fail `validate` and name the expectation that caught it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipelines.prepare import prepare
from pipelines.validate import DataValidationError, build_validation_frame, run_suite, validate
from tuneloop.config import load_params

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = load_params(REPO_ROOT / "params.yaml")


@pytest.fixture(scope="module")
def clean_splits() -> dict[str, pd.DataFrame]:
    """The sample prepared the default way: its frozen test file as the test split."""
    return prepare(
        REPO_ROOT / "data/sample/intents.csv",
        PARAMS.data,
        PARAMS.prepare,
        REPO_ROOT / "data/sample/intents-test.csv",
    ).splits


def failed_checks(splits) -> dict[str, object]:
    outcome = run_suite(build_validation_frame(splits), PARAMS.validate_, PARAMS.data.labels)
    return {failure.check: failure for failure in outcome.failed}


def test_the_sample_passes_every_check(clean_splits):
    assert failed_checks(clean_splits) == {}


def _copy(splits):
    return {name: part.copy() for name, part in splits.items()}


def null_text(splits):
    splits["train"].loc[3, "text"] = None
    return splits


def blank_text(splits):
    splits["val"].loc[0, "text"] = "   "
    return splits


def unknown_label(splits):
    splits["train"].loc[:2, "label"] = "refund_statuss"
    return splits


def two_labels_for_one_text(splits):
    row = splits["train"].iloc[[0]].copy()
    row["label"] = next(label for label in PARAMS.data.labels if label != row["label"].iloc[0])
    splits["train"] = pd.concat([splits["train"], row], ignore_index=True)
    return splits


def class_below_minimum(splits):
    train = splits["train"]
    rare = train.index[train["label"] == "request_invoice"][5:]
    splits["train"] = train.drop(index=rare).reset_index(drop=True)
    return splits


def leak_test_rows_into_train(splits):
    splits["train"] = pd.concat([splits["train"], splits["test"].head(4)], ignore_index=True)
    return splits


def leak_test_rows_into_val(splits):
    # Case and punctuation do not hide a leak: the check compares folded texts.
    leaked = splits["test"].head(3).assign(text=lambda rows: rows["text"].str.upper() + "!")
    splits["val"] = pd.concat([splits["val"], leaked], ignore_index=True)
    return splits


@pytest.mark.parametrize(
    ("corrupt", "check"),
    [
        (null_text, "text_not_null"),
        (blank_text, "text_not_blank"),
        (unknown_label, "label_in_known_set"),
        (two_labels_for_one_text, "one_label_per_text"),
        (class_below_minimum, "min_examples_per_class"),
        (leak_test_rows_into_train, "no_test_text_in_train"),
        (leak_test_rows_into_val, "no_test_text_in_train"),
    ],
)
def test_each_corruption_is_caught_by_its_expectation(clean_splits, corrupt, check):
    failures = failed_checks(corrupt(_copy(clean_splits)))
    assert check in failures
    assert failures[check].unexpected_count >= 1
    assert failures[check].examples, "the summary must show failing rows"


def test_the_default_split_keeps_the_frozen_test_rows_out_of_train_and_val(clean_splits):
    test = set(clean_splits["test"]["text"])
    frozen = pd.read_csv(REPO_ROOT / "data/sample/intents-test.csv", dtype=str)
    assert len(clean_splits["test"]) == len(frozen)
    assert test.isdisjoint(clean_splits["train"]["text"]) and test.isdisjoint(clean_splits["val"]["text"])


def test_validate_writes_result_and_data_docs_and_raises_a_readable_summary(clean_splits, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, part in unknown_label(_copy(clean_splits)).items():
        part.to_parquet(prepared / f"{name}.parquet", index=False)
    with pytest.raises(DataValidationError) as error:
        validate(prepared, PARAMS.validate_, PARAMS.data.labels, tmp_path / "report")
    message = str(error.value)
    assert "label_in_known_set" in message and "refund_statuss" in message
    assert (tmp_path / "report/result.json").stat().st_size > 0
    assert (tmp_path / "report/data_docs/index.html").exists()
