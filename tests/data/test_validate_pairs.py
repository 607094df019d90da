"""The pairs suite, run for real with Great Expectations on frames cut from the generative sample.

Each defect a user could ship in (message, target) pairs must fail, name the expectation that caught it
and show the offending row, so it can be found and fixed in its file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from evaluation.generation import REQUIRED_FIELDS, is_valid, parse_output
from pipelines.validate_pairs import validate_pairs
from tests.support import build_tiny_decoder, settings
from tuneloop.config import load_params
from tuneloop.io import read_table

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS = load_params(REPO_ROOT / "params.yaml")
GENERATION = PARAMS.generation
CHECKS = PARAMS.validate_
MESSAGE, TARGET = GENERATION.input_column, GENERATION.target_column

Splits = dict[str, pd.DataFrame]


@pytest.fixture(scope="module")
def count_tokens(tmp_path_factory) -> Callable[[Sequence[str]], list[int]]:
    """Token counts from a decoder tokenizer, counted as `pipelines.sft` counts a target."""
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_decoder(tmp_path_factory.mktemp("decoder")))

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def sample_splits(pool_rows: int | None = None, test_rows: int | None = None) -> Splits:
    """The pool split into train/val (seeded, as `prepare` would), the frozen test file as test."""
    pool = read_table(REPO_ROOT / "data/sample/support-pairs.csv").head(pool_rows)
    test = read_table(REPO_ROOT / "data/sample/support-pairs-test.csv").head(test_rows)
    val = pool.sample(frac=PARAMS.prepare.val_fraction, random_state=PARAMS.prepare.seed)
    return {"train": pool.drop(index=val.index), "val": val, "test": test}


def tiny_splits() -> Splits:
    # Fresh copies per test: a corruption must not leak into the next one.
    return sample_splits(pool_rows=200, test_rows=40)


def run(splits: Splits, count_tokens, validate=CHECKS, **kwargs):
    return validate_pairs(
        splits["train"], splits["val"], splits["test"], count_tokens, GENERATION, validate, **kwargs
    )


def failures_by_check(splits: Splits, count_tokens) -> dict:
    return {failure.check: failure for failure in run(splits, count_tokens).failed}


def test_the_sample_passes_every_check(count_tokens):
    outcome = run(sample_splits(), count_tokens)
    assert outcome.success, outcome.summary()
    assert outcome.checks_run == 10 and outcome.failed == []


# Each corruption changes one row and returns where it is (split, row label) for the report to show.


def target_not_json(splits: Splits) -> tuple[str, int]:
    row = splits["train"].index[2]
    splits["train"].loc[row, TARGET] = "intent: refund_status, order_id: NW-1234"
    return "train", row


def target_missing_a_key(splits: Splits) -> tuple[str, int]:
    row = splits["val"].index[1]
    target = json.loads(splits["val"].loc[row, TARGET])
    del target["urgency"]
    splits["val"].loc[row, TARGET] = json.dumps(target)
    return "val", row


def target_with_text_around_the_object(splits: Splits) -> tuple[str, int]:
    # parse_output would read it (it scores generations leniently); a target is learnt verbatim.
    row = splits["train"].index[5]
    splits["train"].loc[row, TARGET] = "Here is the JSON: " + splits["train"].loc[row, TARGET]
    return "train", row


def blank_message(splits: Splits) -> tuple[str, int]:
    row = splits["train"].index[7]
    splits["train"].loc[row, MESSAGE] = "   "
    return "train", row


def null_message(splits: Splits) -> tuple[str, int]:
    row = splits["test"].index[3]
    splits["test"].loc[row, MESSAGE] = None
    return "test", row


def blank_target(splits: Splits) -> tuple[str, int]:
    row = splits["train"].index[9]
    splits["train"].loc[row, TARGET] = ""
    return "train", row


def message_over_the_token_limit(splits: Splits) -> tuple[str, int]:
    row = splits["train"].index[4]
    splits["train"].loc[row, MESSAGE] = " ".join([splits["train"].loc[row, MESSAGE]] * 40)
    return "train", row


def target_over_the_token_limit(splits: Splits) -> tuple[str, int]:
    # Still a valid object: only its length is wrong, so only the length check may catch it.
    row = splits["val"].index[0]
    target = json.loads(splits["val"].loc[row, TARGET])
    target["reply"] = " ".join([target["reply"]] * 12)
    splits["val"].loc[row, TARGET] = json.dumps(target)
    return "val", row


def leak_into_train_with_other_case_and_punctuation(splits: Splits) -> tuple[str, int]:
    row = splits["train"].index[6]
    splits["train"].loc[row, MESSAGE] = splits["test"][MESSAGE].iloc[0].upper().rstrip("?.!") + " ?!"
    return "train", row


def leak_into_val(splits: Splits) -> tuple[str, int]:
    row = splits["val"].index[3]
    splits["val"].loc[row, MESSAGE] = splits["test"][MESSAGE].iloc[5].lower()
    return "val", row


@pytest.mark.parametrize(
    ("corrupt", "check"),
    [
        (target_not_json, "target_is_json"),
        (target_missing_a_key, "target_matches_schema"),
        (target_with_text_around_the_object, "target_is_json"),
        (blank_message, "message_not_blank"),
        (null_message, "message_not_null"),
        (blank_target, "target_not_blank"),
        (message_over_the_token_limit, "message_tokens_in_bounds"),
        (target_over_the_token_limit, "target_tokens_in_bounds"),
        (leak_into_train_with_other_case_and_punctuation, "no_test_message_in_train"),
        (leak_into_val, "no_test_message_in_train"),
    ],
)
def test_each_defect_is_caught_by_its_expectation_and_shows_the_row(count_tokens, corrupt, check):
    splits = tiny_splits()
    split, row = corrupt(splits)
    failures = failures_by_check(splits, count_tokens)
    assert check in failures, f"{check} did not fail; failed: {sorted(failures)}"
    assert failures[check].unexpected_count == 1
    [example] = failures[check].examples
    assert (example["split"], example["row"]) == (split, row)
    assert example[MESSAGE] == _none_if_na(splits[split].loc[row, MESSAGE])
    assert example[TARGET] == splits[split].loc[row, TARGET]


def test_a_too_long_side_shows_its_token_count(count_tokens):
    splits = tiny_splits()
    message_over_the_token_limit(splits)
    [example] = failures_by_check(splits, count_tokens)["message_tokens_in_bounds"].examples
    assert example[f"{MESSAGE}_tokens"] > GENERATION.max_input_tokens


def test_the_schema_check_agrees_with_the_evaluation_contract(count_tokens):
    """A target passes exactly when it is JSON that `evaluation.generation.is_valid` accepts.

    Not `parse_output`: it digs the object out of ``[{...}]`` or prose, as generations need; a target
    is learnt verbatim, so it must be the object itself.
    """
    splits = tiny_splits()
    train = splits["train"]
    base = json.loads(train[TARGET].iloc[0])
    variants = [
        {**base, "order_id": None, "product": None},
        {**base, "order_id": "NW-48305", "product": "blender"},
        {**base, "reply": None},
        {**base, "urgency": 3},
        {**base, "notes": "extra key"},
        {key: base[key] for key in REQUIRED_FIELDS[1:]},
        [base],
        "a JSON string, not an object",
    ]
    rows = train.index[: len(variants)]
    train.loc[rows, TARGET] = [json.dumps(variant) for variant in variants]
    outcome = run(splits, count_tokens, validate=settings("validate_", examples_per_failure=len(variants)))
    failures = {failure.check: failure for failure in outcome.failed}
    rejected = {example["row"] for example in failures["target_matches_schema"].examples}
    expected = {row for row in rows if not is_valid(json.loads(train.loc[row, TARGET]))}
    assert rejected == expected and len(expected) == 6
    assert is_valid(parse_output(train.loc[rows[6], TARGET])), "the lenient reading accepts [{...}]"


def test_duplicates_in_train_fail_only_beyond_the_allowed_share(count_tokens):
    splits = tiny_splits()
    train = splits["train"]
    allowed_rows = int(CHECKS.max_duplicate_share * len(train))

    def repeat_messages(rows: int) -> Splits:
        copy = {name: part.copy() for name, part in splits.items()}
        # Each message copied once onto another row: `rows` rows in all occur twice (folded).
        sources, sinks = train.index[: rows // 2], train.index[rows // 2 : rows // 2 * 2]
        copy["train"].loc[sinks, MESSAGE] = train.loc[sources, MESSAGE].str.upper().to_numpy()
        return copy

    assert "duplicate_share_bounded" not in failures_by_check(repeat_messages(allowed_rows), count_tokens)
    failure = failures_by_check(repeat_messages(allowed_rows + 4), count_tokens)["duplicate_share_bounded"]
    assert failure.unexpected_count == allowed_rows // 2 * 2 + 4
    assert {example["split"] for example in failure.examples} == {"train"}


def test_the_report_names_the_expectation_and_shows_at_most_examples_per_failure(count_tokens, tmp_path):
    splits = tiny_splits()
    broken = splits["train"].index[:8]
    splits["train"].loc[broken, TARGET] = "not json"
    validate = settings("validate_", examples_per_failure=3)
    outcome = run(splits, count_tokens, validate=validate, report_dir=tmp_path / "report")
    assert not outcome.success
    [failure] = outcome.failed
    assert (failure.check, failure.expectation) == (
        "target_is_json",
        "expect_column_values_to_be_json_parseable",
    )
    assert failure.unexpected_count == 8 and len(failure.examples) == 3
    summary = outcome.summary()
    assert "target_is_json" in summary and "expect_column_values_to_be_json_parseable" in summary
    assert summary.count("e.g.") == 3 and "not json" in summary
    written = json.loads((tmp_path / "report/summary.json").read_text())
    assert written["failed"][0]["check"] == "target_is_json" and not written["success"]
    assert (tmp_path / "report/result.json").stat().st_size > 0
    assert (tmp_path / "report/data_docs/index.html").exists()


def test_a_token_counter_that_loses_texts_is_refused():
    with pytest.raises(ValueError, match="counts for"):
        run(tiny_splits(), lambda texts: [1] * (len(texts) - 1))


def test_a_split_without_the_configured_columns_is_refused():
    splits = tiny_splits()
    splits["val"] = splits["val"].rename(columns={TARGET: "answer"})
    with pytest.raises(ValueError, match="val split has no column"):
        run(splits, lambda texts: [len(text.split()) for text in texts])


def _none_if_na(value):
    return None if pd.isna(value) else value
