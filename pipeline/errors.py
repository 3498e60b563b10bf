"""The errors krunch raises for bad input.

Every message names the input (a model reference, a file, a field) and the
reason, and where possible what to do instead; the CLI prints it as one line.
"""


class KrunchError(ValueError):
    """Bad input from the user: reported as one line, never as a traceback."""

    exit_code = 2  # the CLI's exit status for this kind of error

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"{subject}: {reason}")

    def __reduce__(self) -> tuple:
        """Pickle by (subject, reason), so the error crosses process boundaries (Ray tasks) intact."""
        return (type(self), (self.subject, self.reason))


class ServiceUnavailable(KrunchError):
    """A server krunch needs (MLflow, Ray) does not answer: not the user's input, and worth retrying."""

    exit_code = 3


class ModelSourceError(KrunchError):
    """A model reference that cannot be resolved or loaded."""


class UnsafeCheckpointError(ModelSourceError):
    """A checkpoint that would need arbitrary unpickling: refused, never loaded."""


class DataError(KrunchError):
    """An evaluation or calibration data set that is missing or too small."""


class MissingExtra(KrunchError):
    """An optional part of krunch whose packages are not installed."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Fail with the install command when an optional dependency is missing, before anything starts."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(module, f"not installed; {purpose} needs it: pip install 'krunch[{extra}]'")
