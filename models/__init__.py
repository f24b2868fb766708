"""What the networks are: the ggml binding, mllama hyperparameters, GGUF keys and tensor names.

Nothing here knows about the UI or about files other than GGUF; `assistant/` and `convert/` both build on it.
As the lowest package it also holds the two things every layer shares: the base class of the errors a user
can cause (errors.py) and files written whole or not at all (atomic_write.py).
"""
