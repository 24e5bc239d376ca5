"""Errors raised by weightpack. Every user-facing failure is a WeightpackError with a one-line message."""


class WeightpackError(Exception):
    """Base class: a failure the user can act on (bad input, bad file, failed check)."""

    exit_code = 2


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
