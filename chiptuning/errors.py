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


#: Modules whose exceptions mean the Hugging Face Hub could not be reached or refused a request
#: (network, authentication, offline mode; the HTTP client's module may be a renamed build).
HUB_ERROR_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


def is_hub_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the Hugging Face Hub client or the HTTP stack under it."""
    return type(err).__module__.startswith(HUB_ERROR_MODULES)


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
