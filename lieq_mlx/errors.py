"""Typed exceptions of lieq-mlx.

Every error a user can cause derives from `LieqError`. Its message is one line that names
the offending value and the fix; the command-line front end prints it without a traceback.
"""


class LieqError(Exception):
    """Base class of the errors a user can cause and fix."""


class ModelNotFoundError(LieqError):
    """A model name, folder or Hugging Face repo id could not be resolved."""


class DemoModelMissingError(ModelNotFoundError):
    """The package that ships the demo GGUF file is not installed."""


class UnsupportedModelError(LieqError):
    """A model architecture or tensor type that lieq-mlx cannot handle."""


class DataError(LieqError):
    """A text file is missing, empty or too short for the requested windows."""


class BudgetError(LieqError):
    """A bit budget that the chosen widths cannot meet."""


class OutputExistsError(LieqError):
    """An output folder exists and `--force` was not given."""


class ScoresFileError(LieqError):
    """A scores JSON file is missing, malformed or belongs to another model."""
