"""Errors that mean "the user's input is wrong". The CLI prints them as one line, with no traceback."""


class So3kratesError(Exception):
    """Base class: a problem with the user's input that the message fully explains."""


class DataError(So3kratesError):
    """A data file cannot be used; the message names the file, the frame and the key."""


class ConfigError(So3kratesError):
    """A configuration is invalid; the message names the key."""
