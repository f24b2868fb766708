"""What the networks are: the ggml binding, mllama hyperparameters, GGUF keys and tensor names.

Nothing here knows about the UI or about files other than GGUF; `assistant/` and `convert/` both build on it.
"""
