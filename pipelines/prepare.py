"""`prepare` stage: raw table -> normalised, de-duplicated, stratified train/val Parquet, plus the frozen
test file (data.test_path) as the test split. With `task: generation` the rows are (message, target)
pairs (`prepare_pairs`).

The test split is never redrawn from the raw data: `tuneloop init` splits it off once into its own
DVC-tracked file, so every model (and every retraining on grown raw data) is scored on the same rows.
Raw rows whose text is in that file are dropped before the train/val split (prepare.drop_test_overlap).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tuneloop.config import DataParams, GenerationParams, PrepareParams, load_params
from tuneloop.io import file_md5, read_table, write_json
from tuneloop.paths import PREPARED_DIR, SPLITS
from tuneloop.text import fold_text, normalise_whitespace

log = logging.getLogger(__name__)

# A class needs this many rows to appear in all three splits; rarer classes stay in train so that
# `validate` can name them instead of the split crashing here.
MIN_ROWS_TO_STRATIFY = 3


@dataclass(frozen=True)
class PrepareResult:
    splits: dict[str, pd.DataFrame]
    label_names: tuple[str, ...]
    source_md5: str
    dropped_duplicates: int
    dropped_test_overlap: int = 0


def map_columns(frame: pd.DataFrame, data: DataParams) -> pd.DataFrame:
    """Rename the user's columns to `text`, `label` and the group columns; fail naming what is missing."""
    wanted = {data.text_column: "text", data.label_column: "label"}
    wanted.update({column: column for column in data.group_columns})
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise KeyError(
            f"columns {missing} are not in the data (it has {list(frame.columns)}); "
            "set data.text_column / data.label_column / data.group_columns in params.yaml"
        )
    mapped = frame[list(wanted)].rename(columns=wanted)
    mapped["text"] = mapped["text"].astype("string")
    mapped["label"] = mapped["label"].astype("string")
    for column in data.group_columns:
        mapped[column] = mapped[column].astype("string").fillna("unknown")
    return mapped


def _split_off(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified split of ``fraction`` of the rows; labels too rare to stratify stay in the first part."""
    strata = frame["label"].fillna("<missing>")
    splittable = strata.map(strata.value_counts()) >= MIN_ROWS_TO_STRATIFY
    kept, split = train_test_split(
        frame[splittable], test_size=fraction, random_state=seed, stratify=strata[splittable]
    )
    return pd.concat([kept, frame[~splittable]]), split


def split_stratified(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_frame: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """Split rows into train/val/test keeping each label's share the same in every split.

    With ``test_frame`` (a frozen test set) the rows are split into train/val only.
    """
    if test_frame is None:
        frame, test = _split_off(frame, test_fraction, seed)
        val_share = val_fraction / (1 - test_fraction)
    else:
        test, val_share = test_frame, val_fraction
    train, val = _split_off(frame, val_share, seed)
    return {name: part.reset_index(drop=True) for name, part in zip(SPLITS, (train, val, test), strict=True)}


def load_mapped(path: Path, data: DataParams) -> pd.DataFrame:
    frame = map_columns(read_table(path), data)
    frame["text"] = normalise_whitespace(frame["text"])
    return frame


def prepare(
    raw_path: Path, data: DataParams, params: PrepareParams, test_path: Path | None = None
) -> PrepareResult:
    """Read, map, normalise, de-duplicate and split the raw data (and a frozen test file, if given).

    Without ``test_path`` the test split is drawn from the raw data (library use only: the stage always
    passes the frozen file).
    """
    frame = load_mapped(raw_path, data)
    before = len(frame)
    frame = frame.drop_duplicates(subset=["text", "label"]).reset_index(drop=True)
    test_frame = load_mapped(test_path, data) if test_path else None
    overlap = 0
    if test_frame is not None and params.drop_test_overlap:
        in_test = fold_text(frame["text"]).isin(set(fold_text(test_frame["text"]).dropna()))
        overlap = int(in_test.sum())
        frame = frame[~in_test].reset_index(drop=True)
    splits = split_stratified(frame, params.val_fraction, params.test_fraction, params.seed, test_frame)
    return PrepareResult(
        splits=splits,
        label_names=data.labels,
        source_md5=file_md5(raw_path),
        dropped_duplicates=before - len(frame) - overlap,
        dropped_test_overlap=overlap,
    )


def load_pairs(path: Path, generation: GenerationParams, group_columns: tuple[str, ...]) -> pd.DataFrame:
    """The (message, target) columns named in ``generation`` and the group columns, messages normalised."""
    frame = read_table(path)
    wanted = [generation.input_column, generation.target_column, *group_columns]
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise KeyError(
            f"columns {missing} are not in {path} (it has {list(frame.columns)}); with `task: generation` "
            "set generation.input_column / generation.target_column / data.group_columns in params.yaml"
        )
    pairs = frame[wanted].copy()
    pairs[generation.input_column] = normalise_whitespace(pairs[generation.input_column].astype("string"))
    pairs[generation.target_column] = pairs[generation.target_column].astype("string")
    for column in group_columns:
        pairs[column] = pairs[column].astype("string").fillna("unknown")
    return pairs


def _target_intent(target: object) -> str:
    """The target's ``intent`` (the stratum of the split), or a marker `validate` will refuse anyway."""
    try:
        parsed = json.loads(str(target))
    except (TypeError, ValueError):
        return "<not json>"
    return str(parsed.get("intent")) if isinstance(parsed, dict) else "<not an object>"


def prepare_pairs(
    raw_path: Path,
    generation: GenerationParams,
    group_columns: tuple[str, ...],
    params: PrepareParams,
    test_path: Path,
) -> PrepareResult:
    """`task: generation`: de-duplicate the pairs by message, drop messages of the frozen test file, and
    split train/val stratified by the target's intent (so every intent is validated on)."""
    message = generation.input_column
    frame = load_pairs(raw_path, generation, group_columns)
    before = len(frame)
    folded = fold_text(frame[message])
    frame = frame[~folded.duplicated(keep="first") | folded.isna()].reset_index(drop=True)
    test_frame = load_pairs(test_path, generation, group_columns)
    overlap = 0
    if params.drop_test_overlap:
        in_test = fold_text(frame[message]).isin(set(fold_text(test_frame[message]).dropna()))
        overlap = int(in_test.sum())
        frame = frame[~in_test].reset_index(drop=True)
    strata = frame.assign(label=frame[generation.target_column].map(_target_intent))
    splits = split_stratified(strata, params.val_fraction, params.test_fraction, params.seed, test_frame)
    return PrepareResult(
        splits={name: part.drop(columns="label", errors="ignore") for name, part in splits.items()},
        label_names=(),
        source_md5=file_md5(raw_path),
        dropped_duplicates=before - len(frame) - overlap,
        dropped_test_overlap=overlap,
    )


def write_prepared(result: PrepareResult, raw_path: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in result.splits.items():
        part.to_parquet(out_dir / f"{name}.parquet", index=False)
    write_json(out_dir / "labels.json", list(result.label_names))
    write_json(
        out_dir / "meta.json",
        {
            "source_path": str(raw_path),
            "source_md5": result.source_md5,
            "rows": {name: len(part) for name, part in result.splits.items()},
            "dropped_exact_duplicates": result.dropped_duplicates,
            "dropped_test_overlap": result.dropped_test_overlap,
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw-path", help="defaults to data.raw_path in params")
    parser.add_argument("--out-dir", default=str(PREPARED_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    raw_path = Path(args.raw_path or params.data.raw_path)
    if not params.data.test_path:
        raise SystemExit(
            "data.test_path is not set: the test set must be a frozen file, or every change to the raw "
            "data would redraw it. Run `tuneloop init` (it splits one off once), or set data.test_path."
        )
    test_path = Path(params.data.test_path)
    if params.task == "generation":
        result = prepare_pairs(
            raw_path, params.generation, params.data.group_columns, params.prepare, test_path
        )
    else:
        result = prepare(raw_path, params.data, params.prepare, test_path)
    write_prepared(result, raw_path, Path(args.out_dir))
    log.info(
        "prepared %s with the frozen test file %s: %s (dropped %d exact duplicates, %d rows whose text "
        "is in the test file)",
        raw_path,
        test_path,
        {name: len(part) for name, part in result.splits.items()},
        result.dropped_duplicates,
        result.dropped_test_overlap,
    )


if __name__ == "__main__":
    main()
