"""The one exception type for bad user input, so the command line can print it without a traceback."""


class DataError(ValueError):
    """Bad input data or configuration; the message names the file (or key) and what is wrong."""
