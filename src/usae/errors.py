"""One exception type for every problem a user can fix."""


class UsaeError(Exception):
    """A clear, user-facing error: bad input, a wrong config, a corrupt file.

    The CLI prints its message without a traceback and exits with status 2.
    """
