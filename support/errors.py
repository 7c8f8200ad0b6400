"""The errors the scripts report as one line (`train_gpt2.py: error: ...`), and what makes a message one line."""

import os
import sys


class TrainError(ValueError):
    """Bad input or configuration: reported as one line before step 0."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops, and its last checkpoint stays as it was."""


def one_line(msg) -> str:
    """An error message as one line, for a command line's `error: ...`."""
    return " ".join(str(msg).split())


def report_error(script: str, msg) -> None:
    """`script: error: msg` on stderr in a single write. Ranks under torchrun share one stderr, and print() writes
    the text and its newline separately, so two ranks' lines could run together; one write of under PIPE_BUF
    bytes to a pipe is never split."""
    line = f"{script}: error: {one_line(msg)}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (pytest's capsys): write it there
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    sys.stderr.flush()  # whatever came before goes first
    os.write(fd, line.encode(errors="backslashreplace"))
