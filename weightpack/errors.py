"""Errors raised by weightpack. Every user-facing failure is a WeightpackError with a one-line message.

One class per kind of fault, so that a caller can tell them apart:

    CheckpointError   the source checkpoint (file, sharded set, folder) is missing or malformed
    FormatError       a .wpk container (or a sharded set's index) is damaged, hostile or of an unknown version
    RecipeError       a recipe (preset, TOML file, dict) is unknown or malformed
    UsageError        an argument or option is invalid or conflicts with another (a size, --bits, a device, ...)
    BudgetError       rate control cannot meet the requested bits per weight or size
    OutputError       the output cannot be written (exists without --force, unwritable folder, ...)
    ClusterError      the Ray cluster is missing, unreachable, or lost a task for good
    ModelLoadError    a model cannot be filled from a container (missing or unexpected names, shapes)
    VerifyError       verification found a difference (verify(..., check=True)); exit code 1
"""

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


class UsageError(WeightpackError):
    """An argument of a call (an option of the command) is invalid or conflicts with another."""


class BudgetError(WeightpackError):
    """Rate control cannot meet the requested bits per weight or file size."""


class OutputError(WeightpackError):
    """The output cannot be written (exists without --force, unwritable folder, ...)."""


class ClusterError(WeightpackError):
    """Work on a Ray cluster failed: Ray is not installed, the cluster does not answer, or a task was lost."""


class ModelLoadError(WeightpackError, RuntimeError):
    """A model could not be filled from a container: missing or unexpected names under `strict`, or a shape
    mismatch. A RuntimeError too, as safetensors' (and torch's) load errors are."""


class VerifyError(WeightpackError):
    """Verification found a difference (raised by `verify(..., check=True)`): exit code 1. `report` is the
    full VerifyReport."""

    exit_code = 1

    def __init__(self, message: str = "", *, api: str | None = None, report=None):
        super().__init__(message, api=api)
        self.report = report
