"""The runtime's error a user can cause."""


class ModelError(ValueError):
    """A model, prompt or image the runtime cannot use; the message is one line for the user."""
