"""`validate` stage: run the Great Expectations suite on the prepared splits; a failure stops the run.

The suite lives in ``pipelines/expectations/intents.json``. Checks that span rows (a text with two
labels, test text in train or val, per-class counts, near-duplicates) are turned into per-row columns
first, so that each is a plain GX column expectation whose failing rows can be shown.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.core import ExpectationSuiteValidationResult
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from tuneloop.config import Params, ValidateParams, load_params
from tuneloop.io import write_json
from tuneloop.paths import PREPARED_DIR, SPLITS, VALIDATION_REPORT_DIR
from tuneloop.text import fold_text

log = logging.getLogger(__name__)

SUITE_PATH = Path(__file__).parent / "expectations" / "intents.json"


class DataValidationError(RuntimeError):
    """Raised when the prepared data fails the suite; the message is the readable summary."""


@dataclass(frozen=True)
class FailedCheck:
    check: str
    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[dict[str, Any]]


@dataclass(frozen=True)
class ValidationOutcome:
    success: bool
    failed: list[FailedCheck]
    checks_run: int
    raw_result: dict[str, Any] = field(repr=False)

    def summary(self) -> str:
        if self.success:
            return f"data validation passed: {self.checks_run} checks"
        lines = [f"data validation FAILED: {len(self.failed)} of {self.checks_run} checks"]
        for failure in self.failed:
            where = f" on column '{failure.column}'" if failure.column else ""
            lines.append(
                f"- {failure.check} ({failure.expectation}{where}): {failure.unexpected_count} rows fail"
            )
            lines.extend(f"    e.g. {example}" for example in failure.examples)
        return "\n".join(lines)

    def write(self, report_dir: Path) -> None:
        """The full GX result and the summary (which checks failed, with examples) into ``report_dir``."""
        write_json(report_dir / "result.json", self.raw_result)
        write_json(
            report_dir / "summary.json",
            {
                "success": self.success,
                "checks_run": self.checks_run,
                "failed": [failure.__dict__ for failure in self.failed],
            },
        )


def build_validation_frame(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Stack the splits and add the per-row columns that the cross-row expectations read."""
    frame = pd.concat([part.assign(split=name) for name, part in splits.items()], ignore_index=True)
    folded = fold_text(frame["text"].fillna("")).where(frame["text"].notna())
    frame["labels_for_text"] = frame.groupby(folded, dropna=False)["label"].transform("nunique")
    frame.loc[folded.isna(), "labels_for_text"] = 1
    train_counts = frame.loc[frame["split"] == "train", "label"].value_counts()
    frame["train_examples_for_label"] = frame["label"].map(train_counts).fillna(0).astype(int)
    frame["near_duplicate"] = folded.duplicated(keep=False) & folded.notna()
    # Leakage into the frozen test set: a test text in train, or in val (which picks the checkpoint).
    test_keys = set(folded[frame["split"] == "test"].dropna())
    frame["test_text_in_train"] = frame["split"].isin(["train", "val"]) & folded.isin(test_keys)
    return frame


def load_suite(known_labels: tuple[str, ...]) -> gx.ExpectationSuite:
    spec = json.loads(SUITE_PATH.read_text(encoding="utf-8"))
    return gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"], meta=spec.get("meta"))


def run_checkpoint(
    frame: pd.DataFrame,
    suite: gx.ExpectationSuite,
    name: str,
    data_docs_dir: Path | None = None,
    expectation_parameters: dict | None = None,
) -> ExpectationSuiteValidationResult:
    """``suite`` on ``frame`` in one ephemeral GX context and checkpoint; Data Docs into ``data_docs_dir``."""
    # GX's per-metric progress bars would bury the summary; the suite takes well under a second.
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            progress_bars=ProgressBarsConfig(globally=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(),
        ),
    )
    if data_docs_dir is not None:
        context.add_data_docs_site(
            site_name="tuneloop",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(data_docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    batch_definition = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all_splits")
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=context.suites.add(suite))
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if data_docs_dir else [],
            result_format={"result_format": "COMPLETE"},
        )
    )
    checkpoint_result = checkpoint.run(
        batch_parameters={"dataframe": frame}, expectation_parameters=expectation_parameters or {}
    )
    return next(iter(checkpoint_result.run_results.values()))


def run_suite(
    frame: pd.DataFrame,
    params: ValidateParams,
    known_labels: tuple[str, ...],
    data_docs_dir: Path | None = None,
) -> ValidationOutcome:
    """Validate ``frame`` with the repo's suite; build GX Data Docs into ``data_docs_dir`` if given."""
    result = run_checkpoint(
        frame,
        load_suite(known_labels),
        "prepared_data",
        data_docs_dir,
        expectation_parameters={
            "min_text_chars": params.min_text_chars,
            "max_text_chars": params.max_text_chars,
            "known_labels": list(known_labels),
            "min_examples_per_class": params.min_examples_per_class,
            "min_unique_share": 1.0 - params.max_duplicate_share,
        },
    )
    failed = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        assert config is not None, "GX reports each result with the expectation that produced it"
        details = item.result or {}
        rows = details.get("unexpected_index_list") or []
        shown = [c for c in ("split", "label", "text") if c in frame.columns]
        examples = [
            {key: _plain(frame.at[index, key]) for key in shown}
            for index in rows[: params.examples_per_failure]
        ]
        failed.append(
            FailedCheck(
                check=(config.meta or {}).get("check", config.type),
                expectation=config.type,
                column=config.kwargs.get("column"),
                unexpected_count=int(details.get("unexpected_count") or 0),
                examples=examples,
            )
        )
    return ValidationOutcome(
        success=bool(result.success),
        failed=failed,
        checks_run=len(result.results),
        raw_result=result.to_json_dict(),
    )


def _plain(value: Any) -> Any:
    return None if pd.isna(value) else value


def validate(
    prepared_dir: Path,
    params: ValidateParams,
    known_labels: tuple[str, ...],
    report_dir: Path,
) -> ValidationOutcome:
    """Validate the prepared splits, write the full result and Data Docs, raise on failure."""
    splits = {name: pd.read_parquet(prepared_dir / f"{name}.parquet") for name in SPLITS}
    frame = build_validation_frame(splits)
    outcome = run_suite(frame, params, known_labels, data_docs_dir=report_dir / "data_docs")
    outcome.write(report_dir)
    if not outcome.success:
        raise DataValidationError(outcome.summary())
    return outcome


def validate_prepared_pairs(prepared_dir: Path, params: Params, report_dir: Path) -> ValidationOutcome:
    """`task: generation`: the pairs suite (`pipelines.validate_pairs`), token counts from the base's
    tokenizer; writes the same report files as `validate` and raises on failure."""
    from transformers import AutoTokenizer

    from pipelines.validate_pairs import validate_pairs
    from serving.inference import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(params.model.base))

    def count_tokens(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    train, val, test = (pd.read_parquet(prepared_dir / f"{name}.parquet") for name in SPLITS)
    outcome = validate_pairs(train, val, test, count_tokens, params.generation, params.validate_, report_dir)
    if not outcome.success:
        raise DataValidationError(outcome.summary())
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared-dir", default=str(PREPARED_DIR))
    parser.add_argument("--report-dir", default=str(VALIDATION_REPORT_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    # result.json and the Data Docs carry run ids and times, so they are reports, not DVC outputs
    # (dvc.yaml): DVC no longer clears them before the stage runs, and GX would keep old runs' pages.
    shutil.rmtree(Path(args.report_dir) / "data_docs", ignore_errors=True)
    try:
        if params.task == "generation":
            outcome = validate_prepared_pairs(Path(args.prepared_dir), params, Path(args.report_dir))
        else:
            outcome = validate(
                Path(args.prepared_dir), params.validate_, params.data.labels, Path(args.report_dir)
            )
    except DataValidationError as error:
        print(str(error), file=sys.stderr)
        print(
            f"full result: {args.report_dir}/result.json, Data Docs: {args.report_dir}/data_docs/index.html",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    log.info(outcome.summary())


if __name__ == "__main__":
    main()
