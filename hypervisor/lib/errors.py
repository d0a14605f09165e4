"""Errors a user can cause: one clear line, exit status 2, no traceback."""


class HvlabError(Exception):
    """A problem with the user's input (scenario, kernel, image, options)."""

    exit_status = 2
