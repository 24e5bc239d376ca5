"""Errors raised by weightpack. Every user-facing failure is a WeightpackError with a one-line message."""

from __future__ import annotations


class WeightpackError(Exception):
    """Base class: a failure the user can act on (bad input, bad file, failed check).

    The message is in the command line's words (flags such as --force); `api`, when given, is the same
    message in the Python API's words (arguments such as force=True): str() of an error raised by the API
    is that one, `cli_message` the command line's."""

    exit_code = 2

    def __init__(self, message: str = "", *, api: str | None = None):
        super().__init__(api if api is not None else message)
        self.cli_message = message


class CheckpointError(WeightpackError):
    """The source checkpoint (safetensors file, sharded set or folder) is missing or malformed."""


class FormatError(WeightpackError):
    """A .wpk container is damaged, truncated, hostile or of an unknown version."""


class RecipeError(WeightpackError):
    """A recipe is unknown or has an unknown key or a wrong type."""


class OutputError(WeightpackError):
    """The output cannot be written (exists without --force, unwritable folder, ...)."""


class VerifyError(WeightpackError):
    """Verification found a difference: exit code 1."""

    exit_code = 1
