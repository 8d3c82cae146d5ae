"""One exception type per kind of user mistake.

Every message says what went wrong *and* what to do about it. The CLI turns
any :class:`ParotidOARError` into a one-line message and a non-zero exit code
(see ``__main__.py``); anything else is a bug and keeps its traceback.
"""


class ParotidOARError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is used by the CLI."""

    exit_code = 2


class InputError(ParotidOARError):
    """The input image or file is unusable (not CT, not 3D, no spacing, unreadable...)."""


class GeometryError(ParotidOARError):
    """Two images do not share a grid, or a geometry is degenerate."""


class EmptyStructureError(ParotidOARError):
    """A structure that must exist is empty (for example the stage-1 parotid)."""


class ModelError(ParotidOARError):
    """A model bundle is missing, corrupt, tampered with or incompatible."""


class OutputError(InputError):
    """An output cannot be written where asked (no such folder, a file in the way, read-only, no space)."""


class OutputExistsError(OutputError):
    """Refusing to overwrite an existing output without ``--force``."""


class DicomError(ParotidOARError):
    """A DICOM series cannot be used as given (several CT series, gantry tilt...)."""


class DatasetError(ParotidOARError):
    """A training dataset failed validation; the message lists every problem."""


class ReviewError(ParotidOARError):
    """A review record or log is invalid."""


class Cancelled(ParotidOARError):
    """The run was cancelled (Ctrl-C / SIGTERM). No partial output was left."""

    exit_code = 130


class DependencyError(ParotidOARError):
    """An optional package that the requested feature needs is not installed (the message says what to install)."""
