import pandas as pd
import pytest

from pipelines.prepare import map_columns, split_stratified
from tests.support import settings
from tuneloop.text import normalise_whitespace

DATA = settings(
    "data",
    raw_path="x.csv",
    text_column="utterance",
    label_column="intent",
    group_columns=("channel",),
    labels=("a", "b"),
)


def test_map_columns_renames_and_keeps_groups():
    raw = pd.DataFrame({"utterance": ["hi"], "intent": ["a"], "channel": ["chat"], "extra": [1]})
    mapped = map_columns(raw, DATA)
    assert list(mapped.columns) == ["text", "label", "channel"]


def test_map_columns_names_the_missing_column():
    with pytest.raises(KeyError, match="utterance"):
        map_columns(pd.DataFrame({"text": ["hi"], "intent": ["a"], "channel": ["x"]}), DATA)


def test_normalise_whitespace_collapses_and_keeps_nulls():
    out = normalise_whitespace(pd.Series(["  where\tis   my\norder ", None], dtype="string"))
    assert out[0] == "where is my order"
    assert pd.isna(out[1])


def _frame(per_label: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [f"text {label} {i}" for label in "abc" for i in range(per_label)],
            "label": [label for label in "abc" for _ in range(per_label)],
        }
    )


def test_split_is_stratified_disjoint_and_seeded():
    frame = _frame(40)
    splits = split_stratified(frame, 0.1, 0.2, seed=7)
    assert sum(len(s) for s in splits.values()) == len(frame)
    assert set(splits["train"].text).isdisjoint(splits["test"].text)
    for part in splits.values():
        shares = part.label.value_counts(normalize=True)
        assert shares.max() - shares.min() < 0.05
    again = split_stratified(frame, 0.1, 0.2, seed=7)
    assert again["test"].text.tolist() == splits["test"].text.tolist()


def test_rare_label_stays_in_train_instead_of_crashing():
    frame = pd.concat([_frame(20), pd.DataFrame({"text": ["lonely"], "label": ["z"]})])
    splits = split_stratified(frame, 0.1, 0.2, seed=1)
    assert "lonely" in splits["train"].text.tolist()


def test_frozen_test_frame_is_used_as_is():
    test = pd.DataFrame({"text": ["frozen"], "label": ["a"]})
    splits = split_stratified(_frame(20), 0.1, 0.2, seed=1, test_frame=test)
    assert splits["test"].text.tolist() == ["frozen"]
    assert len(splits["train"]) + len(splits["val"]) == 60
