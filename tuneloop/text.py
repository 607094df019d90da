"""Text normalisation shared by the stages and the drift monitor, so that all of them agree on what
counts as the same text."""

from __future__ import annotations

import pandas as pd


def normalise_whitespace(texts: pd.Series) -> pd.Series:
    """Collapse runs of whitespace and strip ends; nulls stay null so `validate` can report them."""
    return texts.str.replace(r"\s+", " ", regex=True).str.strip()


def fold_text(texts: pd.Series) -> pd.Series:
    """Case- and punctuation-insensitive key, so 'Where is it?' and 'where is it' count as one text."""
    return texts.str.casefold().str.replace(r"[^\w\s]", "", regex=True).str.replace(r"\s+", " ", regex=True)
