"""One exception type for every problem a user can fix."""


class UsaeError(Exception):
    """A clear, user-facing error: bad input, a wrong config, a corrupt file.

    The CLI prints its message without a traceback and exits with status 2.
    """


class ConfigMismatch(UsaeError):
    """``--resume`` was given a config that differs from the run's own (the message names
    the keys). Callers that may start afresh instead (``usae demo``) catch this type."""
