"""User-facing errors: the CLI prints these as one line, without a stack trace."""


class MobileInstError(Exception):
    """A problem with the user's input (file, option, data), explained in the message."""


class CheckpointError(MobileInstError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(MobileInstError):
    """A dataset, annotation file or image that cannot be used."""
