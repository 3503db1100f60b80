"""The package's own exception types, for errors a user can act on.

All are `ValueError`s, so existing `except ValueError` code keeps working.
"""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit (every converter raises it)."""


class PresetError(ValueError):
    """A preset name is unknown or its weights cannot be fetched or read."""


class CommandError(Exception):
    """Bad input to the `keras-vmoe` command: reported as one line, exit status 1."""
