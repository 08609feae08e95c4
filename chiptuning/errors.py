"""Errors a user can cause. The CLI turns each into one line and a non-zero exit, no traceback."""


class ChipTuningError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug)."""


class DataError(ChipTuningError):
    """Bad task data: missing column, unknown label, empty text, unreadable file."""


class CacheError(ChipTuningError):
    """A cache that is missing, incomplete, corrupt, or made by other settings."""


class ProvenanceError(ChipTuningError):
    """An artifact that does not match the model, cache or chips it claims to come from."""


class UnsupportedModelError(ChipTuningError):
    """A model architecture the registry does not know."""
