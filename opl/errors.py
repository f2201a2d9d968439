"""Errors a user can act on. `train.py` prints their message and exits non-zero."""


class OPLError(Exception):
    """Base class: the message says what is wrong and what to do."""


class ConfigError(OPLError):
    """An impossible or inconsistent configuration value."""


class DatasetNotFoundError(OPLError):
    """Dataset files are missing or malformed at the configured root."""


class CheckpointError(OPLError):
    """A checkpoint is corrupt, or does not match the model / run it is loaded into."""


class RunFolderError(OPLError):
    """A run folder is in use by another process, or holds a file that cannot be repaired safely."""


class NonFiniteLossError(OPLError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step
