"""The runtime's error a user can cause."""

from models.errors import LvaError


class ModelError(LvaError):
    """A model, prompt or image the runtime cannot use; the message is one line for the user."""
