"""The exceptions main.py reports on one line, without a traceback: bad user input, an external program (Java)
that failed in a way the user has to act on, a training run that cannot go on, and Ctrl-C."""


class InputError(ValueError):
    """Bad input from the user's files or flags. The message names the file, row/key/id and the reason."""


class ToolError(RuntimeError):
    """An external program (Java: METEOR, the PTB tokenizer) is missing, crashed, timed out or answered
    garbage. The message says which and what happened (with its stderr)."""


class TrainingError(RuntimeError):
    """Training cannot go on, or a model cannot be evaluated: a loss or a model's scores became NaN or infinite.
    The message names the step or the item, and the last good checkpoint, which is left intact."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run. The message says where the last checkpoint is (and how to resume), or that none
    was written; main.py prints it on one line and exits with 130."""
