"""One base class for every error a user can cause; the CLI catches it once and prints one line.

Each message names the file (or option) and says why, so it can be shown as it is.
"""


class MadError(Exception):
    """A request mad cannot serve; `str(error)` is the one line to show the user."""


class CheckpointError(MadError):
    """A model or checkpoint file that cannot be used (message names the file and says why)."""
