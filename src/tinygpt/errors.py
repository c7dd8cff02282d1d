"""The one exception type that reaches a user as a message instead of a traceback."""


class TinyGPTError(Exception):
    """A problem with the user's input (a path, a file, a setting).

    The CLI prints ``str(err)`` as one line and exits with status 2. Library callers can catch it
    like any other exception. Configuration dataclasses raise ``ValueError`` instead, which the
    CLI treats the same way.
    """
