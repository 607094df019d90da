"""Progress output decisions: bars on a terminal only, and the line one epoch becomes in a log file."""

from __future__ import annotations

import io

from tuneloop.progress import epoch_line, interactive


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_is_interactive_and_a_file_or_missing_stream_is_not(monkeypatch):
    assert interactive(_Terminal())
    assert not interactive(io.StringIO())
    monkeypatch.setattr("sys.stderr", None)
    assert not interactive()


def test_interactive_reads_stderr_by_default(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert interactive()


def test_an_epoch_line_names_each_figure_and_leaves_out_those_missing():
    row = {"epoch": 2.0, "train_loss": None, "val_loss": 0.69094, "val_macro_f1": 0.5}
    assert epoch_line(row, 5) == "epoch 2/5: val_loss 0.6909, val_macro_f1 0.5000"
