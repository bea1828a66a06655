"""The exceptions that the CLI turns into a single error line (exit 2, or the run's own code)."""


class ZoftError(ValueError):
    """Bad input a user can fix: unknown task, missing file, invalid hyperparameter, NaN loss."""

    exit_code = 2


class RunStopped(ZoftError):
    """A run stopped before its end and can be resumed (a signal, a full disk): its folder stays."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunDiverged(ZoftError):
    """A run stopped because its loss diverged, collapsed or went non-finite: an error for one run,
    a result for a point of an lr sweep (``zoft grid`` records it and goes on). ``metrics`` is the
    run's metrics.jsonl up to that step, read before its folder goes."""

    metrics: str = ""


class RunTaken(ZoftError):
    """Another live process holds this run's folder: a grid moves on to its next run."""
