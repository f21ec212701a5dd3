"""Errors that mean "the user's input is wrong". The CLI prints them as one line, with no traceback."""


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
