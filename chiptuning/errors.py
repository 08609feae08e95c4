"""Errors a user can cause (the CLI turns each into one line and a non-zero exit, no traceback), and
the old names of renamed public names."""

import warnings


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


def is_hub_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the Hugging Face Hub client or the HTTP stack under it: the Hub could
    not be reached or refused a request (network, authentication, offline mode)."""
    return type(err).__module__.startswith(("huggingface_hub", "httpx", "httpcore", "requests", "urllib3"))


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def renamed(module: str, names: dict[str, str], namespace: dict):
    """A module ``__getattr__`` answering each old name of ``names`` (old -> new) with the new name's
    value from ``namespace``, with a DeprecationWarning."""
    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is now {names[name]}", DeprecationWarning, stacklevel=2)
        return namespace[names[name]]
    return __getattr__
