"""Errors a user can cause: one clear line, exit status 2, no traceback."""


class HvlabError(Exception):
    """A problem with the user's input (scenario, kernel, image, options)."""

    exit_status = 2


class SaveError(HvlabError):
    """A domain cannot be saved (it has shut down, or its kind cannot be)."""


class RestoreError(HvlabError):
    """An image cannot be restored; the message names the record and its offset."""
