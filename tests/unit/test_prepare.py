import json

import pandas as pd
import pytest
import yaml

from pipelines.prepare import map_columns, prepare_pairs, split_stratified
from tests.support import REPO_ROOT, settings
from tuneloop.text import normalise_whitespace

DATA = settings(
    "data",
    raw_path="x.csv",
    text_column="utterance",
    label_column="intent",
    group_columns=("channel",),
    labels=("a", "b"),
)
DATA_ABC = DATA.model_copy(update={"labels": ("a", "b", "c")})


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


def _write_raw(frame: pd.DataFrame, path):
    frame.rename(columns={"text": "utterance", "label": "intent"}).assign(channel="chat").to_csv(
        path, index=False
    )
    return path


def test_frozen_test_file_is_the_test_split_and_its_texts_leave_train_and_val(tmp_path):
    from pipelines.prepare import prepare

    raw = _frame(30)
    frozen = raw.iloc[::10].assign(text=lambda rows: rows["text"].str.upper() + "?")
    params = settings("prepare", drop_test_overlap=True)
    result = prepare(
        _write_raw(raw, tmp_path / "raw.csv"), DATA_ABC, params, _write_raw(frozen, tmp_path / "test.csv")
    )
    assert result.splits["test"]["text"].tolist() == frozen["text"].tolist()
    assert result.dropped_test_overlap == len(frozen)
    trained = set(result.splits["train"]["text"]) | set(result.splits["val"]["text"])
    assert trained.isdisjoint(raw.iloc[::10]["text"])
    assert len(trained) == len(raw) - len(frozen)


def test_appending_rows_to_the_raw_data_never_changes_the_test_split(tmp_path):
    """The frozen promise: feedback appended to the raw data lands in train/val, the test split stays."""
    from pipelines.prepare import prepare

    params = settings("prepare", drop_test_overlap=True)
    raw = _frame(30)
    test_file = _write_raw(raw.iloc[::5], tmp_path / "test.csv")
    before = prepare(_write_raw(raw, tmp_path / "raw.csv"), DATA_ABC, params, test_file).splits
    grown = pd.concat([raw, _frame(45).iloc[30:]], ignore_index=True)
    after = prepare(_write_raw(grown, tmp_path / "raw.csv"), DATA_ABC, params, test_file).splits
    pd.testing.assert_frame_equal(before["test"], after["test"])
    assert len(after["train"]) + len(after["val"]) > len(before["train"]) + len(before["val"])


def test_without_dropping_the_overlap_stays_for_validate_to_refuse(tmp_path):
    from pipelines.prepare import prepare

    raw = _frame(30)
    params = settings("prepare", drop_test_overlap=False)
    result = prepare(
        _write_raw(raw, tmp_path / "raw.csv"), DATA_ABC, params, _write_raw(raw.head(3), tmp_path / "t.csv")
    )
    assert result.dropped_test_overlap == 0
    trained = set(result.splits["train"]["text"]) | set(result.splits["val"]["text"])
    assert set(raw.head(3)["text"]) <= trained


def test_the_stage_refuses_to_redraw_a_test_split_without_a_frozen_file(tmp_path, monkeypatch):
    from pipelines.prepare import main

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["test_path"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="data.test_path is not set"):
        main(["--params", "params.yaml", "--out-dir", str(tmp_path / "out")])


def test_pairs_are_deduplicated_kept_apart_from_the_test_file_and_split_by_intent(tmp_path):
    """`task: generation` on the pairs sample, with copies of test messages slipped into the raw file."""
    generation = settings("generation")
    raw = pd.read_csv(REPO_ROOT / "data/sample/support-pairs.csv")
    test = pd.read_csv(REPO_ROOT / "data/sample/support-pairs-test.csv")
    leaked = test.head(3).assign(message=lambda frame: frame["message"].str.upper())
    raw_path = tmp_path / "pairs.csv"
    pd.concat([raw, raw.head(5), leaked]).to_csv(raw_path, index=False)
    test_path = tmp_path / "pairs-test.csv"
    test.to_csv(test_path, index=False)

    result = prepare_pairs(raw_path, generation, ("channel",), settings("prepare"), test_path)

    assert (result.dropped_duplicates, result.dropped_test_overlap) == (5, 3)
    train, val, frozen = (result.splits[name] for name in ("train", "val", "test"))
    assert len(train) + len(val) == len(raw) and len(frozen) == len(test)
    assert list(train.columns) == ["message", "target", "channel"]
    intents = {
        name: part["target"].map(lambda t: json.loads(t)["intent"]) for name, part in result.splits.items()
    }
    assert set(intents["val"]) == set(intents["train"])  # stratified: every intent is validated on
    assert result.label_names == ()


def test_pairs_without_the_configured_columns_are_refused_by_name(tmp_path):
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"text": ["hi"], "answer": ["{}"]}).to_csv(path, index=False)
    with pytest.raises(KeyError, match=r"\['message', 'target'\].*generation.input_column"):
        prepare_pairs(path, settings("generation"), (), settings("prepare"), path)
