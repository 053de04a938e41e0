"""One exception type for every user-facing error: the CLI prints its message and exits 2."""


class GlmtuneError(Exception):
    """An error in the user's input (files, flags, checkpoints) with a message that says what to fix."""
