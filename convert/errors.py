"""Errors a user can cause while converting; the CLI prints them in one line."""

from models.errors import LvaError


class ConvertError(LvaError):
    """A problem with the input or the environment that the user can fix (bad checkpoint, no access, no disk)."""
