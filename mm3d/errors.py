"""The one error type for a user's mistake.

A :class:`UserError` says what is wrong with something the user gave — a config key or value, a
file, a command-line flag, a checkpoint — in one line that names it (file and line, key, path).
The ``mm3d`` command prints it as ``mm3d CMD: error: MESSAGE`` and exits with status 2, without a
traceback; any other exception is a bug in mm3d and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message says what and where, in one line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (a list, a label map, an input) does not exist; still an OSError for
    code that handles unreadable files."""
