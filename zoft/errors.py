"""The one exception type that the CLI turns into a single error line (exit 2)."""


class ZoftError(ValueError):
    """Bad input a user can fix: unknown task, missing file, invalid hyperparameter, NaN loss."""
