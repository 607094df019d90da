"""Behavioural tests (evaluation/behavioural.py): perturbations, rates with a fake model, skipped cases,
optional gates."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from evaluation.behavioural import (
    INV_TESTS,
    BehaviouralCases,
    DirCase,
    MftCase,
    add_typos,
    behavioural_tests,
    casing_variants,
    name_variants,
    parse_cases,
    perturb,
    punctuation_variants,
)
from evaluation.gates import evaluate_gates
from tests.support import REPO_ROOT, settings

TEXTS = [
    "Where is my parcel, it was due yesterday?",
    "please cancel order NW-12345",
    "John here, my refund never arrived.",
    "ok",
]


def behavioural_settings(**overrides):
    return settings("evaluate").behavioural.model_copy(update=overrides)


@pytest.mark.parametrize("test", INV_TESTS)
def test_perturbations_are_deterministic_under_a_seed_and_really_perturb(test):
    params = behavioural_settings(seed=7)
    first, again = perturb(TEXTS, test, params), perturb(TEXTS, test, params)
    assert first == again
    for text, variants in zip(TEXTS, first, strict=True):
        assert text not in variants and len(set(variants)) == len(variants)
    assert all(first[:3]), f"{test} left a perturbable text unchanged: {first[:3]}"


def test_a_different_seed_gives_different_typos():
    assert perturb(TEXTS, "inv_typo", behavioural_settings(seed=1)) != perturb(
        TEXTS, "inv_typo", behavioural_settings(seed=2)
    )


def test_typos_touch_only_words_longer_than_three_letters():
    text = "my cat ate the delivery"
    for seed in range(20):
        typo = add_typos(text, 0.5, np.random.default_rng(seed))
        assert typo != text
        assert typo.split()[:4] == ["my", "cat", "ate", "the"]
        assert len(typo) in (len(text), len(text) - 1)
    assert add_typos("ok, 42 it is", 1.0, np.random.default_rng(0)) == "ok, 42 it is"


def test_casing_punctuation_and_name_variants():
    assert casing_variants("Where's my order NW-1?") == [
        "where's my order nw-1?",
        "WHERE'S MY ORDER NW-1?",
        "Where's My Order Nw-1?",
    ]
    variants = punctuation_variants("Hi, where is it?", np.random.default_rng(0))
    assert "Hi, where is it" in variants and "Hi where is it?" in variants
    assert any(v in variants for v in ("Hi, where is it!", "Hi, where is it."))
    names, templates = ("Maria", "John", "Wei"), ("This is {name}. {text}",)
    swapped = name_variants("John here, my refund?", names, templates, 2, np.random.default_rng(0))
    assert sorted(swapped) == ["Maria here, my refund?", "Wei here, my refund?"]
    inserted = name_variants("my refund?", names, templates, 1, np.random.default_rng(0))
    assert len(inserted) == 1 and inserted[0].startswith("This is ") and inserted[0].endswith(". my refund?")


CASES = BehaviouralCases(
    mft=(
        MftCase("cancel it", "cancel"),
        MftCase("where is it", "status"),
        MftCase("stop it now", "cancel"),
        MftCase("close my account", "close_account"),  # not in the label set: skipped
    ),
    dir_negation=(
        DirCase("cancel", "cancel my order", "don't cancel my order, where is it?", "status"),
        DirCase("cancel", "cancel it", "do not cancel it", None),
        DirCase("close_account", "close it", "don't close it", "status"),  # skipped
    ),
)


def keyword_model(texts: list[str]) -> list[str]:
    """'cancel' anywhere means cancel; a typo-ed 'cancel' or an upper-case text does not."""
    return ["cancel" if "cancel" in text else "status" for text in texts]


def test_rates_are_computed_right_with_a_fake_model():
    params = behavioural_settings(failing_examples=1)
    texts = ["cancel my order please", "where is my parcel", "cancel it now", "tracking?"]
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return keyword_model(batch)

    report = behavioural_tests(predict, texts, ["cancel", "status"], CASES, params)
    tests, metrics = report["tests"], report["metrics"]
    assert len(calls) == 1, "every text is predicted in one call"

    # Upper case hides 'cancel' from the keyword model: both cancel texts flip, the others cannot.
    casing = tests["inv_casing"]
    assert (casing["cases"], casing["failures"], casing["failure_rate"]) == (4, 2, 0.5)
    assert casing["failing_examples"] == [
        {
            "text": "cancel my order please",
            "perturbed": "CANCEL MY ORDER PLEASE",
            "prediction": "cancel",
            "perturbed_prediction": "status",
        }
    ]
    # A name or punctuation never hides 'cancel'.
    assert tests["inv_names"]["failures"] == tests["inv_punctuation"]["failures"] == 0
    # "cancel" is the one word longer than 3 letters in "cancel it now", so its typos always flip it;
    # texts without "cancel" cannot flip.
    assert 1 <= tests["inv_typo"]["failures"] <= 2
    # MFT: "stop it now" is the only miss among the three known-label cases.
    assert (tests["mft"]["cases"], tests["mft"]["failures"], tests["mft"]["skipped"]) == (3, 1, 1)
    assert tests["mft"]["failing_examples"][0]["text"] == "stop it now"
    # DIR: both negations still say 'cancel' (one must be 'status', one must not be 'cancel').
    assert (tests["dir_negation"]["cases"], tests["dir_negation"]["failures"]) == (2, 2)
    assert tests["dir_negation"]["skipped"] == 1
    assert metrics["behaviour/mft_failure_rate"] == pytest.approx(1 / 3)
    assert metrics["behaviour/dir_negation_failure_rate"] == 1.0
    assert metrics["behaviour/inv_casing_failure_rate"] == 0.5
    assert metrics["behaviour/inv_max_failure_rate"] == max(
        metrics[f"behaviour/{test}_failure_rate"] for test in INV_TESTS
    )


def test_a_dir_case_passes_when_the_negation_moves_off_the_intent():
    def negation_aware(texts):
        return ["status" if "n't" in t or " not " in t else keyword_model([t])[0] for t in texts]

    report = behavioural_tests(negation_aware, ["x"], ["cancel", "status"], CASES, behavioural_settings())
    assert report["tests"]["dir_negation"]["failures"] == 0


def test_cases_with_unknown_labels_are_skipped_and_leave_no_rate():
    report = behavioural_tests(keyword_model, TEXTS, ["a", "b"], CASES, behavioural_settings())
    assert report["tests"]["mft"] == {
        "cases": 0,
        "failures": 0,
        "failure_rate": None,
        "skipped": 4,
        "failing_examples": [],
        "failures_by_label": {},
    }
    assert report["tests"]["dir_negation"]["skipped"] == 3
    assert "behaviour/mft_failure_rate" not in report["metrics"]
    assert "behaviour/dir_negation_failure_rate" not in report["metrics"]
    assert "behaviour/inv_typo_failure_rate" in report["metrics"]


def test_invariance_uses_at_most_max_examples_seeded():
    texts = [f"where is parcel number {i}" for i in range(50)]
    params = behavioural_settings(max_examples=10)
    seen: list[list[str]] = []
    behavioural_tests(lambda b: seen.append(b) or ["x"] * len(b), texts, ["x"], CASES, params)
    again: list[list[str]] = []
    behavioural_tests(lambda b: again.append(b) or ["x"] * len(b), texts, ["x"], CASES, params)
    originals = [t for t in seen[0] if t in texts]
    assert len(originals) == 10 and seen == again


def test_a_null_gate_is_not_checked_and_a_set_one_fails_when_exceeded():
    metrics = {
        "quality/accuracy": 0.9,
        "behaviour/mft_failure_rate": 0.3,
        "behaviour/inv_max_failure_rate": 0.1,
    }
    report_only = evaluate_gates(
        metrics, {"min_accuracy": 0.8, "max_mft_failure_rate": None, "max_dir_failure_rate": None}
    )
    assert report_only["passed"] and [g["name"] for g in report_only["gates"]] == ["min_accuracy"]
    assert report_only["not_checked"] == ["max_mft_failure_rate", "max_dir_failure_rate"]
    gated = evaluate_gates(metrics, {"max_mft_failure_rate": 0.2, "max_inv_failure_rate": 0.1})
    assert not gated["passed"] and gated["failed"] == ["max_mft_failure_rate"]
    assert "behaviour/mft_failure_rate = 0.3000, must be <= 0.2000: FAILED" in gated["reasons"][0]


def test_the_shipped_cases_cover_every_sample_intent():
    """At least 5 MFT cases for each of the 15 intents, and every DIR label is a real one."""
    labels = set(settings("data").labels)
    raw = yaml.safe_load((REPO_ROOT / "evaluation/behavioural_cases.yaml").read_text(encoding="utf-8"))
    cases = parse_cases(raw)
    per_label = {label: sum(case.label == label for case in cases.mft) for label in labels}
    assert min(per_label.values()) >= 5, per_label
    assert {case.label for case in cases.mft} == labels
    assert len({case.text for case in cases.mft}) == len(cases.mft), "duplicate MFT texts"
    assert cases.dir_negation and all(
        pair.intent in labels and pair.expected in labels and pair.expected != pair.intent
        for pair in cases.dir_negation
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mtf": {}}, "unknown keys"),
        ({"mft": {"cancel": "cancel it"}}, "mft.cancel must be a list"),
        ({"dir_negation": {"cancel": [{"text": "cancel it"}]}}, r"dir_negation.cancel\[0\] needs"),
        ({"dir_negation": {"cancel": [{"text": "a", "negated": "b", "label": "c"}]}}, "takes only"),
    ],
)
def test_a_malformed_cases_file_fails_saying_where(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_cases(raw)
