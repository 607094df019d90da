"""Progress that suits where it is read: bars on a terminal, one line per epoch in a log file.

A tqdm bar redraws itself with carriage returns; on a terminal that is one line that moves, but in a
file or a pipe (DVC, a Prefect worker, CI) every redraw stays, and an evaluation's many short bars
bury the lines that matter. So bars are drawn only when stderr, where tqdm and logging write, is a
terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal, so that a redrawn bar reads as one line."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def quiet_library_bars() -> None:
    """Off a terminal, turn off the bars transformers and huggingface_hub draw themselves (loading
    weights, writing shards, downloads): in a log each is a run of redraws that no log line needs.

    Process-wide, so stage entry points call it, not library code that others import.
    """
    if interactive():
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def epoch_line(row: Mapping[str, float | None], epochs: float) -> str:
    """One epoch's progress as a log line: ``epoch 2/5: train_loss 0.7032, val_loss 0.6909, ...``.

    ``row`` is an epoch's entry of the training history (``epoch`` and the losses and metrics); a
    value the epoch did not produce (``None``) is left out.
    """
    figures = ", ".join(
        f"{name} {value:.4f}" for name, value in row.items() if name != "epoch" and value is not None
    )
    return f"epoch {row['epoch']:g}/{epochs:g}: {figures}"
