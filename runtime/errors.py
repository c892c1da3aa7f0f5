"""One base exception and a few typed subclasses; every message names the thing, the value and what was expected."""


class RetrvError(Exception):
    """Base of every error retrv raises on purpose. The CLI prints its message as one line and exits non-zero."""


class CheckpointError(RetrvError):
    """A checkpoint directory is missing a file or tensor, has a wrong shape, or is of an unsupported type."""


class InputError(RetrvError):
    """A user-supplied value (image, prompt, flag) is out of range or malformed."""


class PackError(RetrvError):
    """A pack is refused on open: missing or modified file, unreadable manifest, or a newer format version."""


class CacheFileError(RetrvError):
    """A candidate token cache is refused on open or append: missing, truncated or modified file, unreadable
    `cache.json`, or a newer format version."""


class IndexFileError(RetrvError):
    """An ANN index is refused on open: missing or modified file, unreadable metadata, newer format, other params."""


class MissingDependencyError(RetrvError):
    """An optional dependency is not installed; the message carries the install hint."""


def require(module: str, extra: str):
    """Import an optional heavy module or raise with an install hint (never installs anything)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'retrv-edge[{extra}]'"
        ) from None
