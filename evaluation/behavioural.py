"""Behavioural tests in the spirit of CheckList (Ribeiro et al., ACL 2020): data in, numbers out.

- INV (invariance): a typo, the casing, a person's name or the punctuation must not change the
  prediction. Each test utterance gets a few seeded perturbations; it fails when any of them is
  predicted differently from the untouched utterance. Labels are not needed.
- DIR (directional, negation): a hand-written utterance of an intent and its negation; the negated
  one must get its stated label (or, without one, anything but the original intent).
- MFT (minimum functionality): short, unambiguous hand-written utterances with their label.

MFT and DIR cases come from a YAML file keyed by intent (``evaluation/behavioural_cases.yaml``);
cases whose labels the model does not know are skipped and counted, so INV runs on any label set.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tuneloop.config import BehaviouralParams

INV_TESTS = ("inv_typo", "inv_casing", "inv_names", "inv_punctuation")
TESTS = (*INV_TESTS, "dir_negation", "mft")
PREFIX = "behaviour"
# Gate-facing summary of the four invariance tests: the worst of them.
INV_MAX_METRIC = f"{PREFIX}/inv_max_failure_rate"

_LONG_WORD = re.compile(r"[^\W\d_]{4,}")
_TRAILING_MARKS = re.compile(r"[.?!]+$")
_MARKS = ("?", "!", ".")


@dataclass(frozen=True)
class MftCase:
    text: str
    label: str


@dataclass(frozen=True)
class DirCase:
    intent: str
    text: str
    negated: str
    # The label the negated text must get; None: anything but ``intent``.
    expected: str | None


@dataclass(frozen=True)
class BehaviouralCases:
    mft: tuple[MftCase, ...]
    dir_negation: tuple[DirCase, ...]


def parse_cases(raw: Mapping | None) -> BehaviouralCases:
    """Check and convert the parsed cases file; a malformed entry fails with where it is."""
    raw = raw or {}
    unknown = set(raw) - {"mft", "dir_negation"}
    if unknown:
        raise ValueError(f"behavioural cases: unknown keys {sorted(unknown)}; use mft and dir_negation")
    mft = []
    for label, texts in (raw.get("mft") or {}).items():
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"behavioural cases: mft.{label} must be a list of non-empty texts")
        mft += [MftCase(text=text, label=str(label)) for text in texts]
    pairs = []
    for intent, entries in (raw.get("dir_negation") or {}).items():
        if not isinstance(entries, list):
            raise ValueError(f"behavioural cases: dir_negation.{intent} must be a list")
        for i, entry in enumerate(entries):
            where = f"dir_negation.{intent}[{i}]"
            if not isinstance(entry, Mapping) or set(entry) - {"text", "negated", "expected"}:
                raise ValueError(f"behavioural cases: {where} takes only text, negated and expected")
            if not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("text", "negated")):
                raise ValueError(f"behavioural cases: {where} needs a non-empty text and negated")
            expected = entry.get("expected")
            if expected is not None and not isinstance(expected, str):
                raise ValueError(f"behavioural cases: {where}.expected must be a label")
            pairs.append(DirCase(str(intent), entry["text"], entry["negated"], expected))
    return BehaviouralCases(mft=tuple(mft), dir_negation=tuple(pairs))


# --- perturbations (each returns the distinct variants that differ from the text; may be empty) ---


def _distinct_changes(text: str, variants: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(v for v in variants if v != text))


def add_typos(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swap two adjacent letters or drop one in ``rate`` of the words longer than 3 letters (at least one)."""
    words = [m.span() for m in _LONG_WORD.finditer(text)]
    if not words:
        return text
    count = max(1, round(rate * len(words)))
    chosen = sorted(rng.choice(len(words), size=min(count, len(words)), replace=False), reverse=True)
    for index in chosen:  # right to left, so earlier spans stay valid
        start, end = words[index]
        word = text[start:end]
        swaps = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
        if swaps and rng.random() < 0.5:
            i = swaps[int(rng.integers(len(swaps)))]
            typo = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        else:
            i = int(rng.integers(len(word)))
            typo = word[:i] + word[i + 1 :]
        text = text[:start] + typo + text[end:]
    return text


def typo_variants(text: str, count: int, rate: float, rng: np.random.Generator) -> list[str]:
    return _distinct_changes(text, [add_typos(text, rate, rng) for _ in range(count)])


def casing_variants(text: str) -> list[str]:
    """All lower case, all upper case, and every word capitalised."""
    return _distinct_changes(text, [text.lower(), text.upper(), string.capwords(text)])


def name_variants(
    text: str, names: Sequence[str], templates: Sequence[str], count: int, rng: np.random.Generator
) -> list[str]:
    """Swap a name from ``names`` found in the text for others; without one, put a name in via a template."""
    found = [name for name in names if re.search(rf"\b{re.escape(name)}\b", text)]
    if found:
        others = [name for name in names if name != found[0]]
        picks = rng.choice(len(others), size=min(count, len(others)), replace=False)
        pattern = re.compile(rf"\b{re.escape(found[0])}\b")
        return _distinct_changes(text, [pattern.sub(others[i], text) for i in picks])
    picks = rng.choice(len(names), size=min(count, len(names)), replace=False)
    forms = rng.integers(len(templates), size=len(picks))
    return _distinct_changes(
        text, [templates[form].format(name=names[i], text=text) for i, form in zip(picks, forms, strict=True)]
    )


def punctuation_variants(text: str, rng: np.random.Generator) -> list[str]:
    """Trailing ?/!/. removed, added or changed, and commas removed."""
    bare = _TRAILING_MARKS.sub("", text).rstrip()
    current = text[len(bare) :].strip()
    other_marks = [mark for mark in _MARKS if mark != current]
    variants = [bare, bare + other_marks[int(rng.integers(len(other_marks)))]]
    if "," in text:
        variants.append(text.replace(",", ""))
    return _distinct_changes(text, [v for v in variants if v.strip()])


def perturb(texts: Sequence[str], test: str, params: BehaviouralParams) -> list[list[str]]:
    """The variants of each text for invariance test ``test``; deterministic under ``params.seed``.

    Each (test, text) pair has its own seeded generator, so a text's variants do not depend on the
    other texts or on which tests run.
    """
    test_index = INV_TESTS.index(test)
    variants = []
    for i, text in enumerate(texts):
        rng = np.random.default_rng([params.seed, test_index, i])
        if test == "inv_typo":
            variants.append(typo_variants(text, params.variants_per_example, params.typo_rate, rng))
        elif test == "inv_casing":
            variants.append(casing_variants(text))
        elif test == "inv_names":
            variants.append(
                name_variants(text, params.names, params.name_templates, params.variants_per_example, rng)
            )
        else:
            variants.append(punctuation_variants(text, rng))
    return variants


def sample_texts(texts: Sequence[str], max_examples: int, seed: int) -> list[str]:
    """At most ``max_examples`` of ``texts`` (seeded, in their original order)."""
    texts = list(texts)
    if len(texts) <= max_examples:
        return texts
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_examples, replace=False))
    return [texts[i] for i in keep]


# --- the suite ---


def _negation_holds(pair: DirCase, negated_prediction: str) -> bool:
    if pair.expected is not None:
        return negated_prediction == pair.expected
    return negated_prediction != pair.intent


def _summary(cases: int, failures: int, skipped: int, examples: list[dict]) -> dict:
    return {
        "cases": cases,
        "failures": failures,
        "failure_rate": failures / cases if cases else None,
        "skipped": skipped,
        "failing_examples": examples,
    }


def behavioural_tests(
    predict: Callable[[list[str]], Sequence[str]],
    texts: Sequence[str],
    label_set: Sequence[str],
    cases: BehaviouralCases,
    params: BehaviouralParams,
) -> dict:
    """Run INV on ``texts`` and the MFT/DIR ``cases`` whose labels are in ``label_set``.

    ``predict`` maps texts to labels; it is called once, on every distinct text the suite needs. Returns
    ``{"metrics": {"behaviour/<test>_failure_rate": ...}, "tests": {<test>: {cases, failures,
    failure_rate, skipped, failing_examples}}}``; a test without cases has no metric (rate None).
    ``behaviour/inv_max_failure_rate`` is the worst invariance rate, for a single gate.
    """
    known = set(label_set)
    originals = sample_texts(texts, params.max_examples, params.seed)
    variants = {test: perturb(originals, test, params) for test in INV_TESTS}
    mft = [case for case in cases.mft if case.label in known]
    pairs = [
        pair
        for pair in cases.dir_negation
        if pair.intent in known and (pair.expected is None or pair.expected in known)
    ]

    needed = list(originals)
    for per_text in variants.values():
        needed += [variant for group in per_text for variant in group]
    needed += [case.text for case in mft] + [t for pair in pairs for t in (pair.text, pair.negated)]
    distinct = list(dict.fromkeys(needed))
    predicted_labels = list(predict(distinct)) if distinct else []
    if len(predicted_labels) != len(distinct):
        raise ValueError(f"predict returned {len(predicted_labels)} labels for {len(distinct)} texts")
    label_of = dict(zip(distinct, (str(label) for label in predicted_labels), strict=True))
    keep = params.failing_examples

    tests: dict[str, dict] = {}
    for test, per_text in variants.items():
        failures, cases_run = 0, 0
        examples: list[dict] = []
        for text, group in zip(originals, per_text, strict=True):
            if not group:
                continue
            cases_run += 1
            changed = [variant for variant in group if label_of[variant] != label_of[text]]
            if changed:
                failures += 1
                if len(examples) < keep:
                    examples.append(
                        {
                            "text": text,
                            "perturbed": changed[0],
                            "prediction": label_of[text],
                            "perturbed_prediction": label_of[changed[0]],
                        }
                    )
        tests[test] = _summary(cases_run, failures, len(originals) - cases_run, examples)

    failed_pairs = [pair for pair in pairs if not _negation_holds(pair, label_of[pair.negated])]
    tests["dir_negation"] = _summary(
        len(pairs),
        len(failed_pairs),
        len(cases.dir_negation) - len(pairs),
        [
            {
                "text": pair.text,
                "negated": pair.negated,
                "prediction": label_of[pair.text],
                "negated_prediction": label_of[pair.negated],
                "expected": pair.expected or f"not {pair.intent}",
            }
            for pair in failed_pairs[:keep]
        ],
    )

    failed_mft = [case for case in mft if label_of[case.text] != case.label]
    tests["mft"] = _summary(
        len(mft),
        len(failed_mft),
        len(cases.mft) - len(mft),
        [
            {"text": case.text, "expected": case.label, "prediction": label_of[case.text]}
            for case in failed_mft[:keep]
        ],
    )
    tests["mft"]["failures_by_label"] = {
        label: sum(case.label == label for case in failed_mft)
        for label in dict.fromkeys(case.label for case in mft)
    }

    metrics = {
        f"{PREFIX}/{test}_failure_rate": float(report["failure_rate"])
        for test, report in tests.items()
        if report["failure_rate"] is not None
    }
    inv_rates = [tests[test]["failure_rate"] for test in INV_TESTS if tests[test]["failure_rate"] is not None]
    if inv_rates:
        metrics[INV_MAX_METRIC] = float(max(inv_rates))
    return {"metrics": metrics, "tests": tests, "utterances_perturbed": len(originals)}
