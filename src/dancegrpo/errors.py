"""Mistakes a user can fix, as opposed to bugs.

Every ``UserError`` carries one line that names the culprit (a config key, a file, a
command-line argument) and what was expected. The command line prints that line and exits
with status 2; any other exception is a bug and keeps its traceback. Each class also derives
from the built-in exception its case has always been (``ValueError`` for a bad value...), so
code catching those keeps working.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "MissingFileError", "UsageError", "CheckpointError", "DeviceError",
           "MissingDependencyError", "RewardError"]


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the culprit."""


class ConfigError(UserError, ValueError):
    """A config file, key or value that does not fit (names the key and what was expected)."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file named by the config or the command line does not exist."""


class UsageError(UserError, ValueError):
    """Command-line arguments that do not fit together."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, damaged, or does not match the run."""


class DeviceError(UserError, RuntimeError):
    """A device that this machine does not have (e.g. ``device=cuda`` without CUDA)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a requested feature needs is not installed (says what to install)."""


class RewardError(UserError, RuntimeError):
    """The rewards left no sample to train on for too long (names the rewards and their errors)."""
