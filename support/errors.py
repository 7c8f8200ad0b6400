"""The errors the scripts report as one line (`train_gpt2.py: error: ...`), and what makes a message one line."""


class TrainError(ValueError):
    """Bad input or configuration: reported as one line before step 0."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the run stops, and its last checkpoint stays as it was."""


def one_line(msg) -> str:
    """An error message as one line, for a command line's `error: ...`."""
    return " ".join(str(msg).split())
