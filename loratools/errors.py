"""The loratools error family.

Every error a user can cause is a :class:`LoratoolsError`. The CLI prints ``Error: <message>`` plus an
optional hint and exits with ``exit_code`` (2: the input cannot be used; 1: the command ran and found
problems). Built-in bases are mixed in where they fit, so ``except FileNotFoundError`` still works.
"""

from __future__ import annotations


class LoratoolsError(Exception):
    """Base class of every error loratools raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, path: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path

    def __str__(self) -> str:
        return self.message


class UsageError(LoratoolsError, ValueError):
    """Options that do not fit together or values out of range."""


class InputNotFoundError(LoratoolsError, FileNotFoundError):
    """A file, folder or Hub repository that does not exist."""


class FormatError(LoratoolsError, ValueError):
    """A file that is not in the format it claims, or in no format we know."""


class UnsupportedError(LoratoolsError, NotImplementedError):
    """A recognized thing we refuse on purpose (LoHa, IA3, Flux layouts, quantized bases, ...)."""


class UnsafeInputError(FormatError):
    """An input that would need code execution or unbounded resources to read (pickles, huge headers)."""


class ValidationError(LoratoolsError, ValueError):
    """An adapter that does not agree with itself or with its base."""


class ShapeError(ValidationError):
    """A tensor whose shape does not fit the module or the base weight."""


class NumericError(ValidationError):
    """NaN or Inf values, or a cast that overflows."""


class OutputExistsError(LoratoolsError, FileExistsError):
    """An output path that exists already (pass --overwrite) or points onto an input."""


class DiskSpaceError(LoratoolsError, OSError):
    """Not enough free space for what a command is about to write."""


class OutputWriteError(LoratoolsError, OSError):
    """An output the file system will not take: a read-only file system, no write permission."""

    def __init__(self, message: str, *, hint: str | None = None, path: object = None, code: int | None = None) -> None:
        super().__init__(message, hint=hint, path=path)
        self.errno = code


class MissingExtraError(LoratoolsError, ImportError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this command needs the '{extra}' extra ({module} is not installed)",
            hint=f"pip install 'loratools[{extra}]'",
        )


class HubError(LoratoolsError):
    """A Hub repository that cannot be resolved, reached or written."""


class VerificationError(LoratoolsError):
    """A check ran and failed (merge --verify, export verification)."""

    exit_code = 1


class LoratoolsWarning(UserWarning):
    """A fact a reader took on a rule the file does not state (an ``.alpha`` of 0 read as alpha = rank): the
    library warns (``warnings.warn``), the CLI prints it as one ``Warning:`` line on stderr (not with ``-q``)."""


def name_list(names: list[str], limit: int) -> str:
    """The first ``limit`` names for a message, comma-separated, `` ...`` when there are more."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def require(module: str, extra: str):  # noqa: ANN201 - returns a module
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(extra, module) from exc
