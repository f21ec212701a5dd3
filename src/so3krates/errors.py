"""Errors that mean "the user's input is wrong", and the one policy that tells them from bugs.

The CLI prints a user error as one line with no traceback and exits with status 2; anything else is a bug
in this package and keeps its traceback, with a line asking to report it (:func:`user_error_message`).
"""

import errno


class So3kratesError(Exception):
    """Base class: a problem with the user's input that the message fully explains."""


class DataError(So3kratesError):
    """A data file cannot be used; the message names the file, the frame and the key."""


class ConfigError(So3kratesError):
    """A configuration is invalid; the message names the key."""


def format_validation_error(error, source: str) -> str:
    """All problems of a pydantic ValidationError on one line, each naming its dotted key.

    Example: ``config.yaml: key 'training.batch_size': Input should be greater than or equal to 1``.
    """
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in item["loc"])
        problems.append(f"key {location!r}: {message}" if location else message)
    return f"{source}: " + "; ".join(problems)


class TrainingError(So3kratesError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


#: Operating-system errors a user causes and can fix (a missing, unwritable or full place, a file where a
#: folder is expected): reported as one line naming the path.
USER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOENT,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
    }
)


def user_error_message(error: BaseException) -> str | None:
    """The one line to show for an error the user caused, or None for a bug (which keeps its traceback).

    User errors: this package's own errors (:class:`So3kratesError`; the CLI's usage errors subclass it),
    file-system errors of :data:`USER_ERRNOS`, and running out of memory.
    """
    if isinstance(error, So3kratesError):
        return str(error)
    if isinstance(error, OSError) and error.errno in USER_ERRNOS:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "out of memory: use a smaller batch (batch_size), fewer atoms, or a machine with more memory"
    return None
