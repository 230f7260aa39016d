"""The one exception type for bad user input (files, rows, values): main.py prints it on one line."""


class InputError(ValueError):
    """Bad input from the user's files or flags. The message names the file, row/key/id and the reason."""
