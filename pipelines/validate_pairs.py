"""Data checks for the generative task: (message, target) pairs, run as a Great Expectations suite.

The pairs teach a decoder to answer a customer message with one JSON object, so a bad row teaches the
wrong thing or silently loses tokens: an empty side, a message or target longer than `pipelines.sft`
keeps (it cuts them), a target that is not the serving schema, a test message seen in training, or a
train split dominated by a few repeated messages. Checks that need a computed value (token counts, the
schema on parseable targets only, cross-split leaks, duplicates) read helper columns added to the
stacked splits first, so that each is a plain GX column expectation whose failing rows can be shown.
The outcome and its summary are `pipelines.validate`'s, so both data checks read the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.core import ExpectationValidationResult

from evaluation.generation import NULLABLE_FIELDS, REQUIRED_FIELDS
from pipelines.validate import FailedCheck, ValidationOutcome, run_checkpoint
from tuneloop.config import GenerationParams, ValidateParams
from tuneloop.text import fold_text

SUITE_NAME = "tuneloop_pairs"
SPLIT_NAMES = ("train", "val", "test")
# Added to the stacked splits: where a row came from, so that a failing row can be found in its file.
SPLIT_COLUMN = "split"
ROW_COLUMN = "row"

TokenCounter = Callable[[Sequence[str]], list[int]]


def target_schema() -> dict[str, Any]:
    """The JSON Schema of a target, derived from `evaluation.generation`'s contract.

    It says what `is_valid` says (exactly REQUIRED_FIELDS, strings, null allowed in NULLABLE_FIELDS),
    so the data is held to the same schema the model's outputs are scored against. The dialect is
    named because GX checks the schema itself once per row (jsonschema.validate), and draft-07's
    meta-schema is about four times cheaper to check than the default 2020-12 one (1 ms vs 5 ms a row).
    """
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "required": list(REQUIRED_FIELDS),
        "additionalProperties": False,
        "properties": {
            field: {"type": ["string", "null"] if field in NULLABLE_FIELDS else "string"}
            for field in REQUIRED_FIELDS
        },
    }


def helper_columns(generation: GenerationParams) -> dict[str, str]:
    """Names of the computed columns, derived from the configured ones so they read as what they are."""
    message, target = generation.input_column, generation.target_column
    return {
        "message_tokens": f"{message}_tokens",
        "target_tokens": f"{target}_tokens",
        "target_if_json": f"{target}_if_json",
        "message_in_test": f"{message}_in_test",
        "message_repeated": f"{message}_repeated_in_train",
    }


def build_pairs_frame(
    splits: dict[str, pd.DataFrame], count_tokens: TokenCounter, generation: GenerationParams
) -> pd.DataFrame:
    """Stack the splits and add the per-row columns that the computed and cross-split checks read.

    A helper value is null where its check does not apply (a null text has no token count, a test row
    cannot leak into test, only train rows count towards the duplicate share): GX column expectations
    skip nulls, so each row is judged only by the checks meant for it.
    """
    message, target = generation.input_column, generation.target_column
    helpers = helper_columns(generation)
    for name, part in splits.items():
        missing = [column for column in (message, target) if column not in part.columns]
        if missing:
            raise ValueError(f"the {name} split has no column {missing} (generation.input/target_column)")
        clashing = [column for column in (SPLIT_COLUMN, ROW_COLUMN, *helpers.values()) if column in part]
        if clashing:
            raise ValueError(f"the {name} split already has column(s) {clashing} that validation adds")
    frame = pd.concat(
        [part.assign(**{SPLIT_COLUMN: name, ROW_COLUMN: part.index}) for name, part in splits.items()],
        ignore_index=True,
    )
    frame[helpers["message_tokens"]] = _token_counts(frame[message], count_tokens)
    frame[helpers["target_tokens"]] = _token_counts(frame[target], count_tokens)
    # GX's schema expectation raises on a value that is not JSON at all (1.24 re-raises json.loads'
    # error), so it reads only the parseable targets; the others fail the parseable check.
    frame[helpers["target_if_json"]] = frame[target].where(frame[target].map(_parses_as_json), None)

    # fold_text keeps the space a dropped "?" leaves at the end; a text of only punctuation has no key.
    folded = fold_text(frame[message].astype("string")).str.strip()
    folded = folded.where(folded != "")
    in_train_or_val = frame[SPLIT_COLUMN].isin(["train", "val"])
    test_keys = set(folded[frame[SPLIT_COLUMN] == "test"].dropna())
    frame[helpers["message_in_test"]] = _only_where(folded.isin(test_keys), in_train_or_val)
    in_train = frame[SPLIT_COLUMN] == "train"
    repeated = folded[in_train].duplicated(keep=False) & folded[in_train].notna()
    frame[helpers["message_repeated"]] = _only_where(
        repeated.reindex(frame.index, fill_value=False), in_train
    )
    return frame


def pairs_suite(generation: GenerationParams, validate: ValidateParams) -> gx.ExpectationSuite:
    """The checks, each named in ``meta["check"]`` so reports and tests can refer to it."""
    message, target = generation.input_column, generation.target_column
    helpers = helper_columns(generation)
    expectations = [
        gx.expectations.ExpectColumnValuesToNotBeNull(column=message, meta={"check": "message_not_null"}),
        gx.expectations.ExpectColumnValuesToNotMatchRegex(
            column=message, regex=r"^\s*$", meta={"check": "message_not_blank"}
        ),
        gx.expectations.ExpectColumnValuesToNotBeNull(column=target, meta={"check": "target_not_null"}),
        gx.expectations.ExpectColumnValuesToNotMatchRegex(
            column=target, regex=r"^\s*$", meta={"check": "target_not_blank"}
        ),
        # Longer sides are cut by `pipelines.sft`: a cut message loses text, a cut target loses its end
        # (and with it the closing brace the model must learn to write).
        gx.expectations.ExpectColumnValuesToBeBetween(
            column=helpers["message_tokens"],
            min_value=1,
            max_value=generation.max_input_tokens,
            meta={"check": "message_tokens_in_bounds"},
        ),
        gx.expectations.ExpectColumnValuesToBeBetween(
            column=helpers["target_tokens"],
            min_value=1,
            max_value=generation.max_target_tokens,
            meta={"check": "target_tokens_in_bounds"},
        ),
        # Strict JSON, unlike `parse_output`'s lenient reading of generations: the target is what the
        # model learns to write verbatim, so text around the object would be learnt too.
        gx.expectations.ExpectColumnValuesToBeJsonParseable(column=target, meta={"check": "target_is_json"}),
        gx.expectations.ExpectColumnValuesToMatchJsonSchema(
            column=helpers["target_if_json"],
            json_schema=target_schema(),
            meta={"check": "target_matches_schema"},
        ),
        gx.expectations.ExpectColumnValuesToBeInSet(
            column=helpers["message_in_test"], value_set=[False], meta={"check": "no_test_message_in_train"}
        ),
        gx.expectations.ExpectColumnValuesToBeInSet(
            column=helpers["message_repeated"],
            value_set=[False],
            mostly=1.0 - validate.max_duplicate_share,
            meta={"check": "duplicate_share_bounded"},
        ),
    ]
    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=expectations,
        meta={"description": "Checks (message, target) pairs must pass before supervised fine-tuning."},
    )


def validate_pairs(
    train: pd.DataFrame,
    val: pd.DataFrame,
    test: pd.DataFrame,
    count_tokens: TokenCounter,
    generation: GenerationParams,
    validate: ValidateParams,
    report_dir: Path | None = None,
) -> ValidationOutcome:
    """Run the pairs suite on the three splits; with ``report_dir``, write the full result, a summary
    and GX Data Docs there (as the `validate` stage does).

    ``count_tokens`` gives the base model tokenizer's count per text (without special tokens, as
    `pipelines.sft` counts a target), so the bounds are checked in the unit the limits are set in.
    Returns the outcome rather than raising, so the caller decides whether a failure stops the run.
    """
    splits = dict(zip(SPLIT_NAMES, (train, val, test), strict=True))
    frame = build_pairs_frame(splits, count_tokens, generation)
    data_docs_dir = report_dir / "data_docs" if report_dir is not None else None
    result = run_checkpoint(frame, pairs_suite(generation, validate), "pairs", data_docs_dir)

    shown = [SPLIT_COLUMN, ROW_COLUMN, generation.input_column, generation.target_column]
    failed = []
    for item in result.results:
        config = item.expectation_config
        assert config is not None, "GX reports each result with the expectation that produced it"
        check = (config.meta or {}).get("check", config.type)
        error = _raised(item)
        if error is not None:
            # A check that could not run says nothing about the data: a bug to fix, not a failed row.
            raise RuntimeError(f"the {check} check ({config.type}) raised instead of validating: {error}")
        if item.success:
            continue
        details = item.result or {}
        column: str = config.kwargs["column"]  # every check in the suite is a column expectation
        # The failing helper value (a token count, a leak flag) says why; the JSON copy only repeats it.
        extra = column not in shown and column != helper_columns(generation)["target_if_json"]
        columns = [*shown, column] if extra else shown
        rows = details.get("unexpected_index_list") or []
        failed.append(
            FailedCheck(
                check=check,
                expectation=config.type,
                column=column,
                unexpected_count=int(details.get("unexpected_count") or 0),
                examples=[
                    {key: _plain(frame.at[index, key]) for key in columns}
                    for index in rows[: validate.examples_per_failure]
                ],
            )
        )
    outcome = ValidationOutcome(
        success=bool(result.success),
        failed=failed,
        checks_run=len(result.results),
        raw_result=result.to_json_dict(),
    )
    if report_dir is not None:
        outcome.write(report_dir)
    return outcome


def _token_counts(texts: pd.Series, count_tokens: TokenCounter) -> pd.Series:
    present = texts.notna()
    values = texts[present].astype(str).tolist()
    counts = count_tokens(values)
    if len(counts) != len(values):
        raise ValueError(f"count_tokens returned {len(counts)} counts for {len(values)} texts")
    return pd.Series(counts, index=texts.index[present], dtype="Int64").reindex(texts.index)


def _parses_as_json(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return False
    return True


def _only_where(values: pd.Series, applies: pd.Series) -> pd.Series:
    """``values`` as Python booleans where the check applies, None elsewhere (GX skips nulls)."""
    return values.astype(object).where(applies, None)


def _raised(item: ExpectationValidationResult) -> str | None:
    info = item.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [value for value in info.values() if isinstance(value, dict) and value.get("raised_exception")]
    return str(nested[0].get("exception_message")) if nested else None


def _plain(value: Any) -> Any:
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
