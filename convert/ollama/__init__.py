"""Models Ollama stored: its local store (`lva import`), its registry (`lva pull`) and its mllama GGUF.

See docs/OLLAMA.md for what Ollama wrote and why each step of the import does what it does.
"""
