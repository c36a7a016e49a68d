"""The one error type resprobe raises for problems it detects (bad values, files, specs).

The command line turns each into a single line on stderr and exit status 1.
"""


class ResprobeError(Exception):
    """A problem with the user's input that resprobe detected and can explain in one line."""


class ModelError(ResprobeError):
    """Unknown model, failed weight loading, unsafe checkpoint."""


class DataError(ResprobeError):
    """Missing, empty, corrupt or inconsistent data."""


class RecordingError(ResprobeError):
    """A recording (HDF5 run file) that is missing, foreign, corrupt or in use."""


class BadValue(ResprobeError):
    """An option value outside its allowed range or in the wrong form."""


class Interrupted(ResprobeError):
    """A run stopped on request (Ctrl-C) after making its work durable; the command line exits 130.

    ``result`` may hold what the command would report for the partial run (e.g. ``complete: false``).
    """

    exit_code = 130

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result
