"""User-facing errors: one clear message that names the problem and what to do."""


class LeanconvError(Exception):
    """An error caused by the user's input (a name, a file, a setting, a model).

    The CLI prints only the message of these; anything else is a bug and keeps its traceback.
    """


class ConfigError(LeanconvError, ValueError):
    """A bad recipe field, layer setting or command-line value."""


class ModelError(LeanconvError):
    """A model that cannot be built, loaded, traced or converted."""


class DataError(LeanconvError):
    """Missing, empty or unreadable data."""


class NumericalError(LeanconvError, FloatingPointError):
    """A NaN or Inf appeared where a finite number is required."""


class OutputError(LeanconvError, OSError):
    """An output that cannot be written: a file where a directory belongs, a read-only or full disk,
    a directory that another leanconv job is writing, or one that holds work not to be overwritten."""
